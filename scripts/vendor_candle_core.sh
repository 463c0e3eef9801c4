#!/usr/bin/env bash
# Recreates third_party/candle-core from the crates.io release and applies
# third_party/candle-core.patch (see third_party/README.md).
#   bash scripts/vendor_candle_core.sh [VERSION]   (default 0.11.1)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.11.1}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# A throwaway crate that depends on exactly that version, so cargo downloads it.
mkdir -p "$TMP/probe/src" && echo 'fn main() {}' > "$TMP/probe/src/main.rs"
printf '[package]\nname = "probe"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncandle-core = "=%s"\n' "$VERSION" > "$TMP/probe/Cargo.toml"
SRC=$(cd "$TMP/probe" && cargo fetch -q && cargo metadata --format-version 1 | python3 -c "
import json, sys
m = json.load(sys.stdin)
print(next(p['manifest_path'] for p in m['packages'] if p['name'] == 'candle-core').rsplit('/', 1)[0])")
rm -rf third_party/candle-core && mkdir -p third_party/candle-core
cp -r "$SRC/src" "$SRC"/LICENSE* "$SRC/README.md" "$SRC/Cargo.toml" third_party/candle-core/
python3 - third_party/candle-core/Cargo.toml <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s = re.sub(r'\n\[\[(example|test|bench)\]\]\n(?:[^\[\n][^\n]*\n)*', '\n', s)  # their sources are not copied
open(p, 'w').write(s)
PY
patch -d third_party/candle-core -p1 < third_party/candle-core.patch
echo "third_party/candle-core: candle-core $VERSION + third_party/candle-core.patch"
