#!/usr/bin/env bash
# Sweep entry point: runs scripts/sweep.py (options: scripts/sweep.sh --help) with the repository's
# .venv/bin/python when it exists, else python3; $PYTHON or --python PY picks another.
#
#   scripts/sweep.sh --root_path DATA [--methods "lora nora"] [--datasets dtd] [--shots "4 16"] [--seeds "1 2 3"]
#                    [--grid lr=1e-3,5e-4] [--config FILE] [--jobs N] [--slurm FILE] [--dry_run] [-- main.py args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
command -v "$python" >/dev/null || { echo "sweep.sh: error: no Python at $python (see README: python3 -m venv .venv)" >&2; exit 2; }
exec "$python" "$here/scripts/sweep.py" "$@"
