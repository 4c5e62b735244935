#!/usr/bin/env bash
# Sign votes on a GPU against one batched forward+backward, in bfloat16 and float32 (one command).
# Prints the device and ends with votes_over_batched_backward=<x> (bfloat16; the floor on a GPU is
# 1.3). Without a GPU it says "no CUDA GPU present" and exits 0 (--allow-cpu measures on the CPU).
# Uses $PYTHON, else the repository's .venv, else python3; options: see gpu_votes.py --help.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$here/gpu_votes.py" "$@"
