#!/usr/bin/env bash
# Set megaflow up in a virtual environment, then run a command inside it:
#
#   ./bootstrap.sh megaflow train --config demo
#   ./bootstrap.sh python -m pytest tests -q
#
# The environment is .venv in this folder (or $MEGAFLOW_VENV). The first call creates it and
# installs torch (the CPU build unless `nvidia-smi` sees a GPU, so a machine without one never
# downloads CUDA), then megaflow with its test extras in editable mode; later calls only check
# that nothing changed (setup.py) and run the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MEGAFLOW_VENV:-$root/.venv}"
torch_version="2.13.0"
py="$venv/bin/python"

if [[ ! -x "$py" ]]; then
  echo "bootstrap: creating $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "bootstrap: installing torch $torch_version (CUDA: an NVIDIA GPU is present)" >&2
    "$py" -m pip install -q "torch==$torch_version"
  else
    echo "bootstrap: installing torch $torch_version, CPU build (no NVIDIA GPU found)" >&2
    "$py" -m pip install -q "torch==$torch_version+cpu" 2>/dev/null \
      || "$py" -m pip install -q "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
stamp="$venv/.megaflow-setup"
want="$root $(sha256sum "$root/setup.py" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "bootstrap: installing megaflow (editable) with its test extras into $venv" >&2
  "$py" -m pip install -q -e "$root[test]"
  echo "$want" > "$stamp"
fi
(( $# )) || { echo "bootstrap: $venv is ready; run a command in it: ./bootstrap.sh megaflow --help" >&2; exit 0; }
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
exec "$@"
