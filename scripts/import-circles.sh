#!/usr/bin/env bash
# Import circles between the files of one Rust crate: prints each circle (the files and, for
# every arrow inside it, the names one file takes from the other) and exits 1 if there is any.
#
#   scripts/import-circles.sh [CRATE_DIR]        # default: crates/models
#   scripts/import-circles.sh crates/mlx-kv
#
# Module = file (src/a/mod.rs is module `a`). An arrow A -> B is a path in A (in a `use` tree or
# in code) that starts with `crate::`, `super::`, `self::` or a child module's name and leads
# to B's module or an item in it; a name that B only re-exports (`pub use`) leads on to the
# file that defines it. `mod x;` declarations are containment, not arrows, and the crate root
# (lib.rs / main.rs), which only declares and re-exports, takes part in none. Comments and
# string literals are ignored; macro bodies are read as plain code.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRATE="${1:-$ROOT/crates/models}"
[ -d "$CRATE/src" ] || { echo "import-circles: $CRATE/src is not a directory (pass a crate directory)" >&2; exit 2; }
exec python3 - "$CRATE" <<'PY'
import os
import re
import sys

crate = sys.argv[1].rstrip("/")
src = os.path.join(crate, "src")
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_of(rel):
    """Module path of a file under src/, or None for the crate root."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]) or parts and parts[0] == "bin":
        return None
    return tuple(parts)


files = {}  # module path -> file (relative to the crate)
for d, _, names in os.walk(src):
    for n in sorted(names):
        if n.endswith(".rs"):
            rel = os.path.relpath(os.path.join(d, n), src)
            mod = module_of(rel)
            if mod is not None:
                files[mod] = os.path.join("src", rel)


def strip(text):
    """Code with comments and string/char literals blanked (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif m := re.compile(r'b?r(#*)"').match(text, i):
            if i and (text[i - 1].isalnum() or text[i - 1] == "_"):
                out.append(c)
                i += 1
                continue
            end = text.find('"' + m.group(1), m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif m := re.compile(r"'(?:\\.[^']*|[^\\'])'").match(text, i):
            out.append("' '")
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def use_leaves(tree):
    """Paths of a use tree (`a::{b, c::d as e, f::*}`) as (segments, name in scope)."""
    toks = re.findall(IDENT + r"|::|[{},*]", tree)
    pos = 0

    def parse(prefix):
        nonlocal pos
        leaves, path = [], list(prefix)
        while pos < len(toks):
            t = toks[pos]
            if t == "::":
                pos += 1
            elif t == "{":
                pos += 1
                while pos < len(toks) and toks[pos] != "}":
                    leaves += parse(path)
                    if pos < len(toks) and toks[pos] == ",":
                        pos += 1
                pos += 1
                return leaves
            elif t in (",", "}"):
                break
            elif t == "*":
                pos += 1
                leaves.append((path, "*"))
                return leaves
            elif t == "as":
                alias = toks[pos + 1]
                pos += 2
                leaves.append((path, alias))
                return leaves
            elif t == "self":
                pos += 1
                if not path:
                    path = ["self"]
            else:
                path = path + [t]
                pos += 1
        if path:
            leaves.append((path, path[-1]))
        return leaves

    out = []
    while pos < len(toks):
        out += parse([])
        pos += 1
    return out


USE = re.compile(r"\b(pub(?:\s*\([^)]*\))?\s+)?use\s+([^;]*);")
INLINE_MOD = re.compile(r"\bmod\s+(" + IDENT + r")\s*\{")
PATH = re.compile(r"(?<![A-Za-z0-9_:$])(" + IDENT + r"(?:\s*::\s*" + IDENT + r")+)")


def children(mod):
    return {m[-1] for m in files if len(m) == len(mod) + 1 and m[: len(mod)] == mod}


def absolute(segs, here):
    """Segments of a path written in module `here`, from the crate root; None if external."""
    first = segs[0]
    if first == "crate":
        return list(segs[1:])
    if first in ("self", "super"):
        base = list(here)
        rest = list(segs)
        while rest and rest[0] in ("self", "super"):
            if rest.pop(0) == "super":
                if not base:
                    return None
                base.pop()
        return base + rest
    if first in children(here):
        return list(here) + list(segs)
    return None


def locate(path):
    """(module of the longest prefix that is a file, the segments after it)."""
    for k in range(len(path), 0, -1):
        if tuple(path[:k]) in files:
            return tuple(path[:k]), path[k:]
    return None, path


texts = {}
reexports = {}  # module -> {name: absolute path it stands for}
inline_at = {}  # module -> [(start, end, inline module path)]
for mod, f in files.items():
    t = strip(open(os.path.join(crate, f), encoding="utf-8").read())
    texts[mod] = t
    spans = []
    for m in INLINE_MOD.finditer(t):
        depth, j = 1, m.end()
        while j < len(t) and depth:
            depth += {"{": 1, "}": -1}.get(t[j], 0)
            j += 1
        spans.append((m.start(), j, m.group(1)))
    inline_at[mod] = spans
    for m in USE.finditer(t):
        if m.group(1):
            for segs, name in use_leaves(m.group(2)):
                a = absolute(segs, mod)
                if a is not None and name != "*":
                    reexports.setdefault(mod, {})[name] = a


def scope(mod, offset):
    """Module path at `offset` of file `mod`, counting inline `mod x { }` blocks."""
    path = list(mod)
    for start, end, name in inline_at[mod]:
        if start <= offset < end:
            path.append(name)
    return tuple(path)


def target(path, seen=()):
    """The file a crate-absolute path leads to, following re-exports."""
    owner, rest = locate(path)
    if owner is None:
        return None
    if rest and rest[0] in reexports.get(owner, {}) and (owner, rest[0]) not in seen:
        again = target(reexports[owner][rest[0]] + rest[1:], seen + ((owner, rest[0]),))
        if again is not None:
            return again
    return owner


edges = {}  # (from, to) -> names
for mod, t in texts.items():
    found = []
    for m in USE.finditer(t):
        here = scope(mod, m.start())
        found += [absolute(segs, here) for segs, _ in use_leaves(m.group(2))]
    code = USE.sub(lambda m: " " * len(m.group(0)), t)
    for m in PATH.finditer(code):
        segs = re.split(r"\s*::\s*", m.group(1))
        found.append(absolute(segs, scope(mod, m.start())))
    for a in found:
        if not a:
            continue
        to = target(a)
        if to is None or to == mod:
            continue
        owner, rest = locate(a)
        edges.setdefault((mod, to), set()).add(rest[0] if rest else "(module)")

graph = {m: sorted({b for (a, b) in edges if a == m}) for m in files}

# Tarjan's strongly connected components: each one with more than one file is a circle.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in sorted(files):
    if v not in index:
        visit(v)

print(f"{os.path.relpath(crate)}: {len(files)} files, {len(edges)} arrows")
if not sccs:
    print("no import circles")
    sys.exit(0)
for k, comp in enumerate(sorted(sccs), 1):
    print(f"circle {k}: {len(comp)} files: " + ", ".join(files[m] for m in comp))
    for a in comp:
        for b in comp:
            if (a, b) in edges:
                print(f"  {files[a]} -> {files[b]}: {', '.join(sorted(edges[(a, b)]))}")
sys.exit(1)
PY
