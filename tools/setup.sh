#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv in .venv with cas (editable) and the test tools.
# torch is pinned to the CPU wheel that lies on this kind of machine (no multi-GB CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
