#!/usr/bin/env bash
# Sweep entry point: runs scripts/sweep.py (options: scripts/sweep.sh --help) with the repository's
# .venv/bin/python when it exists, else python3; $PYTHON or --python PY picks another.
#
#   scripts/sweep.sh --root_path DATA [--methods "lora nora"] [--datasets dtd] [--shots "4 16"] [--seeds "1 2 3"]
#                    [--grid lr=1e-3,5e-4] [--config FILE] [--jobs N] [--slurm FILE] [--dry_run] [-- main.py args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/find_python.sh"
exec "$python" "$here/scripts/sweep.py" "$@"
