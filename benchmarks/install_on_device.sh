#!/usr/bin/env bash
# Lay art_runtime out under a site folder the way an install would, on a GPU machine that has
# no network (and so cannot build the package): carried wheels (.whl/, e.g. the slim
# FlashInfer) go in with pip --no-index, the package by copying its mapped folders.
# Usage: bash benchmarks/install_on_device.sh [SITE]; then export PYTHONPATH=SITE.
set -euo pipefail
site=${1:-/tmp/site}
mkdir -p "$site"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
rm -rf "$site/art_runtime"
cp -r art_runtime "$site/"
for folder in kernels policies dashboards; do cp -r "$folder" "$site/art_runtime/$folder"; done
