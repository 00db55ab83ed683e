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
# Every glibc up to bookworm's 2.36: pip takes only the tags named, and a missing one makes
# it backtrack in silence (CUDA torch needs NCCL's manylinux_2_18 wheel; without that tag
# an unpinned torch fell back to an older or a CPU build).
for glibc in $(seq 5 36); do
    TARGET+=(--platform "manylinux_2_${glibc}_x86_64")
done
TARGET+=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)

rm -rf "$OUT/shard"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/shard" .
WHEEL=$(ls "$OUT"/shard/shard-*.whl)
"$PYTHON" -m pip download -q "${TARGET[@]}" -d "$OUT/deps" "$TORCH" "$WHEEL[server]"
rm -f "$OUT"/deps/shard-*.whl  # pip download copies the project wheel too; it lives apart
# Exactly what this run resolved, pinned; resolving offline also proves the wheelhouse
# complete. Wheels an earlier run left (another TORCH: a CUDA one is 2.8 GB) are removed,
# so the build context holds only what the image installs.
"$PYTHON" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$OUT/deps" "${TARGET[@]}" \
    --report "$OUT/report.json" "$TORCH" "$WHEEL[server]"
"$PYTHON" - "$OUT/report.json" "$OUT/deps" <<'PY'
import json, sys
from pathlib import Path
from urllib.parse import unquote, urlparse
report, deps = sys.argv[1], Path(sys.argv[2])
resolved = [item for item in json.load(open(report))["install"] if item["metadata"]["name"] != "shard"]
(deps / "requirements.txt").write_text(
    "".join(f'{item["metadata"]["name"]}=={item["metadata"]["version"]}\n' for item in resolved))
keep = {Path(unquote(urlparse(item["download_info"]["url"]).path)).name for item in resolved}
for wheel in deps.glob("*.whl"):
    if wheel.name not in keep:
        wheel.unlink()
PY
# Name the torch taken: a CUDA build brings the CUDA runtime as nvidia-*/cuda-* wheels.
cuda=$(grep -cE '^(nvidia|cuda)-' "$OUT/deps/requirements.txt" || true)
echo "wheelhouse: $(ls "$OUT"/deps/*.whl | wc -l) wheels, $(du -sh "$OUT/deps" | cut -f1);" \
    "$(grep '^torch==' "$OUT/deps/requirements.txt") ($( ((cuda)) && echo "CUDA, $cuda CUDA wheels" || echo CPU));" \
    "$(basename "$WHEEL")"
