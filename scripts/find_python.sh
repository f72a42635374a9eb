# Sourced by the scripts' shell wrappers (sweep.sh, gpu_check.sh): sets $python to $PYTHON, else the repository's
# .venv/bin/python when it exists, else python3; exits 2 with one line naming the wrapper when there is none.
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
command -v "$python" >/dev/null || {
  echo "$(basename "$0"): error: no Python at $python (see README: python3 -m venv .venv)" >&2; exit 2; }
