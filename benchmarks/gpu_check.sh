#!/usr/bin/env bash
# One-call GPU check for ray-lipsync's MuseTalk backend (see benchmarks/README.md, "gpu_check").
#
# On a fresh CUDA machine with this checkout:
#   benchmarks/gpu_check.sh            # -> benchmarks/results/gpu_check.json + a short table
# It creates a venv (.venv-gpu, or $GPU_CHECK_VENV) holding the CUDA build of torch 2.13.0 and
# this project with its declared dependencies - nothing else - unless that venv already has
# them, then runs benchmarks/gpu_check.py within an 8-minute budget counted from this start.
# Offline: WHEELS=/path/to/wheels installs from that folder only (pip --no-index).
# TORCH_INDEX_URL=... takes torch from another index (e.g. a CUDA-specific one).
# Extra arguments go to gpu_check.py (e.g. --reduced for a CPU run of the mechanics).
set -euo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
venv=${GPU_CHECK_VENV:-.venv-gpu}
python=${PYTHON:-python3}
reduced=0
for arg in "$@"; do [[ $arg == --reduced ]] && reduced=1; done

pip_args=()
[[ -n ${WHEELS:-} ]] && pip_args+=(--no-index --find-links "$WHEELS")

has_torch() {  # the venv holds torch 2.13.0, a CUDA build unless --reduced
  "$venv/bin/python" - "$reduced" <<'PY' 2>/dev/null
import sys, torch
ok = torch.__version__.split("+")[0] == "2.13.0" and (sys.argv[1] == "1" or torch.version.cuda is not None)
sys.exit(0 if ok else 1)
PY
}

if [[ ! -x $venv/bin/python ]]; then
  echo "gpu_check: creating $venv"
  "$python" -m venv "$venv"
fi
if ! has_torch; then
  echo "gpu_check: installing torch 2.13.0 (CUDA build) into $venv"
  torch_index=()
  [[ -n ${TORCH_INDEX_URL:-} ]] && torch_index+=(--index-url "$TORCH_INDEX_URL")
  "$venv/bin/pip" install -q "${pip_args[@]}" "${torch_index[@]}" torch==2.13.0
  has_torch || { echo "gpu_check: torch in $venv is not the CUDA build of 2.13.0; set TORCH_INDEX_URL or WHEELS" >&2; exit 2; }
fi
if ! "$venv/bin/python" -c "import ray_lipsync, diffusers, transformers, mediapipe" 2>/dev/null; then
  echo "gpu_check: installing the project into $venv"
  "$venv/bin/pip" install -q "${pip_args[@]}" -e ".[prepare]"
fi
"$venv/bin/python" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
left=$(( 480 - ($(date +%s) - started) ))
(( left > 60 )) || { echo "gpu_check: the install took $(( 480 - left )) s: no time left for the check; run again (the venv is kept)" >&2; exit 3; }
export PYTHONUNBUFFERED=1
exec timeout --kill-after=10 "$left" "$venv/bin/python" benchmarks/gpu_check.py --started-at "$started" --budget-s 470 "$@"
