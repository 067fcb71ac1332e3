#!/usr/bin/env bash
# Set up jaxguide from a fresh clone: a virtual environment in .venv with the
# package (editable), the converter's torch (CPU build), earth2studio (jaxguide as one
# of its data-assimilation models) and the test tools.
#   ./setup.sh          CPU (what CI runs)
#   ./setup.sh --gpu    also JAX's CUDA 12 plugin for the pinned jax (NVIDIA GPU, driver >= 525)
set -euo pipefail
cd "$(dirname "$0")"
extras="convert,test,earth2studio"
case "${1:-}" in
  "") ;;
  --gpu) extras="$extras,cuda12" ;;
  *) echo "usage: ./setup.sh [--gpu]" >&2; exit 2 ;;
esac
python3 -m venv .venv
.venv/bin/python -m pip install --upgrade pip >/dev/null
.venv/bin/python -m pip install -e ".[$extras]"
echo "jaxguide is installed in .venv; try: .venv/bin/jaxguide demo --out demo_out"
