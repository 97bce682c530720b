#!/usr/bin/env bash
# GPU readiness check (issue 14): the demo on CUDA with tokens/s per stage against the bf16 peak.
# Uses the project's venv (make install); installs nothing else. Extra arguments go to gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || { echo "no venv at $here/../.venv: run 'make install' first (or set PYTHON)" >&2; exit 1; }
exec "$python" "$here/gpu_check.py" "$@"
