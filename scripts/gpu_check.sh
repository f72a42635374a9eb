#!/usr/bin/env bash
# One prepared GPU check (scripts/gpu_check.py; options: scripts/gpu_check.sh --help): every method's step,
# a short run end to end against CLIP-LoRA's loop, a 1,000-prompt step, the train augmentation on the device.
# At most ~6 minutes on one GPU; prints markdown tables (--out FILE also writes them).
#
#   scripts/gpu_check.sh --out gpu_check.md          # on a GPU
#   scripts/gpu_check.sh --tiny --device cpu         # seconds, on a CPU (the test suite runs this)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/find_python.sh"
exec "$python" "$here/scripts/gpu_check.py" "$@"
