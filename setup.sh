#!/usr/bin/env bash
# Set up jaxguide from a fresh clone: a virtual environment in .venv with the
# package (editable), the converter's torch (CPU build) and the test tools.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --upgrade pip >/dev/null
.venv/bin/python -m pip install -e ".[convert,test]"
echo "jaxguide is installed in .venv; try: .venv/bin/jaxguide demo --out demo_out"
