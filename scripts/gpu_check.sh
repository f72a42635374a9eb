#!/usr/bin/env bash
# One prepared GPU check (scripts/gpu_check.py; options: scripts/gpu_check.sh --help): every method's step,
# a short run end to end against CLIP-LoRA's loop, a 1,000-prompt step, the train augmentation on the device.
# At most ~6 minutes on one GPU; prints markdown tables (--out FILE also writes them).
#
#   scripts/gpu_check.sh --out gpu_check.md          # on a GPU
#   scripts/gpu_check.sh --tiny --device cpu         # seconds, on a CPU (the test suite runs this)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
command -v "$python" >/dev/null || { echo "gpu_check.sh: error: no Python at $python (see README: python3 -m venv .venv)" >&2; exit 2; }
exec "$python" "$here/scripts/gpu_check.py" "$@"
