#!/usr/bin/env bash
# Fills the image's wheelhouse on the host, where pip reaches the package index (inside
# `docker build` it may not): build/wheelhouse/deps holds torch and every dependency of
# shard[server] as CPython 3.11 manylinux x86_64 wheels (the image's Python, whatever the
# host's), build/wheelhouse/shard the project's own wheel. Two folders, so a change to the
# code rebuilds only the image's last layer.
# Usage: docker/wheelhouse.sh PYTHON TORCH   e.g. .venv/bin/python torch==2.13.0
set -euo pipefail
PYTHON=$1
TORCH=$2
OUT=build/wheelhouse
TARGET=(--python-version 3.11 --implementation cp --abi cp311 --only-binary=:all:)
for glibc in 5 12 17 27 28 31 34 35 36; do  # up to bookworm's glibc 2.36; pip takes only the tags named
    TARGET+=(--platform "manylinux_2_${glibc}_x86_64")
done
TARGET+=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)

rm -rf "$OUT/shard"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/shard" .
WHEEL=$(ls "$OUT"/shard/shard-*.whl)
"$PYTHON" -m pip download -q "${TARGET[@]}" -d "$OUT/deps" "$TORCH" "$WHEEL[server]"
rm -f "$OUT"/deps/shard-*.whl  # pip download copies the project wheel too; it lives apart
# Exactly what this run resolved, pinned, so that wheels an earlier run left (another
# TORCH) are not installed; resolving offline also proves the wheelhouse complete.
"$PYTHON" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$OUT/deps" "${TARGET[@]}" \
    --report "$OUT/report.json" "$TORCH" "$WHEEL[server]"
"$PYTHON" - "$OUT/report.json" > "$OUT/deps/requirements.txt" <<'PY'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    if item["metadata"]["name"] != "shard":
        print(f'{item["metadata"]["name"]}=={item["metadata"]["version"]}')
PY
echo "wheelhouse: $(ls "$OUT"/deps/*.whl | wc -l) wheels, $(du -sh "$OUT/deps" | cut -f1); $(basename "$WHEEL")"
