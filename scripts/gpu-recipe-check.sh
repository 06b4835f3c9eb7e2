#!/usr/bin/env bash
# On the lent GPU machine, after `scripts/gpu-run.sh`'s calls A-D (the default model assembled):
# whether first-use kernel compiles still land inside timed runs or requests.
#   1. plain k8v4 and the `--kv 8,4` preset (SmolLM2's per-channel recipe), alternating, two
#      rounds, `bench -d 4096 -p 1 -n 256 -r 3 --host-profile`: each repeat stamped, each custom
#      kernel configuration stamped when first built, and the warm-up's time;
#   2. `serve --kv 8,4 --host-profile`: time to ready (the warm-up), two requests' latency for
#      200 tokens (prompts of different lengths; each crosses several key-group boundaries), then
#      three at once (a batched decode); the kernel configurations first built after `serving`
#      are compiles inside requests.
# Logs go to $OUT (or ./gpu-recipe-check). Usage: scripts/gpu-recipe-check.sh
set -uo pipefail
out=${OUT:-gpu-recipe-check}
mkdir -p "$out"
bin=${KVRT:?source /tmp/kvrt/gpu-env.sh first}/kvsplit-mlx
keep='warm-up|repeat [0-9]|decode split|^\| k8'
for r in 1 2; do
  timeout 200 "$bin" bench --model default --kv k8v4 --kv-plain -d 4096 -p 1 -n 256 -r 3 --host-profile 2>&1 |
    grep -E "$keep|new launch" | cut -c1-220 > "$out/plain$r.log"
  timeout 150 "$bin" bench --model default --kv 8,4 -d 4096 -p 1 -n 256 -r 3 --host-profile 2>&1 |
    grep -E "$keep|new launch" | cut -c1-220 > "$out/recipe$r.log"
  grep -E "$keep" "$out/plain$r.log" "$out/recipe$r.log"
done
t0=$(date +%s.%N)
"$bin" serve --model default --kv 8,4 --port 8091 --host-profile > "$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 180); do grep -q "^serving" "$out/serve.log" && break; sleep 0.5; done
t1=$(date +%s.%N)
curl -s http://127.0.0.1:8091/v1/completions -H 'content-type: application/json' \
  -d '{"model":"default","prompt":"The capital of France is","max_tokens":200,"temperature":0}' > "$out/serve-first.json"
t2=$(date +%s.%N)
curl -s http://127.0.0.1:8091/v1/completions -H 'content-type: application/json' \
  -d '{"model":"default","prompt":"Once upon a time","max_tokens":200,"temperature":0}' > "$out/serve-second.json"
t3=$(date +%s.%N)
reqs=()
for p in "One" "A short story about a cat who" "In 1905, the physicist"; do
  curl -s http://127.0.0.1:8091/v1/completions -H 'content-type: application/json' \
    -d "{\"model\":\"default\",\"prompt\":\"$p\",\"max_tokens\":200,\"temperature\":0}" > /dev/null &
  reqs+=($!)
done
wait "${reqs[@]}"
t4=$(date +%s.%N)
kill "$pid"; wait "$pid" 2>/dev/null
python3 - "$t0" "$t1" "$t2" "$t3" "$t4" <<'PY' | tee "$out/serve-times.txt"
import sys; t0, t1, t2, t3, t4 = map(float, sys.argv[1:])
print(f"serve: ready after {t1 - t0:.1f} s; first request (200 tokens) {t2 - t1:.2f} s; second {t3 - t2:.2f} s; three at once {t4 - t3:.2f} s")
PY
grep -E "warmed up|serving" "$out/serve.log"
echo "kernel configurations first built after serving: $(sed -n '/^serving/,$p' "$out/serve.log" | grep -c 'new launch')"
sed -n '/^serving/,$p' "$out/serve.log" | grep 'new launch' | cut -c1-200 | head -20
