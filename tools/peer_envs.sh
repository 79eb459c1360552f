#!/usr/bin/env bash
# Builds the peer tools' environments that tests/test_peer_loaders.py drives, each in its own venv
# outside the project (Optimum pins an older transformers; it must never replace the project's).
#   tools/peer_envs.sh [ROOT]        (default ROOT: ~/.cache/sqdeploy-peers)
# then: export SQDEPLOY_OPTIMUM_PYTHON=ROOT/optimum/bin/python SQDEPLOY_GENAI_PYTHON=ROOT/genai/bin/python
# The venvs see the system's packages (torch, numpy) so that nothing large is downloaded twice;
# what each peer pins is installed inside its venv and shadows the system's copy there only.
set -euo pipefail
root=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/sqdeploy-peers}
py=${PYTHON:-python3}
build() {  # build NAME PACKAGE...
    local dir="$root/$1"; shift
    [ -x "$dir/bin/python" ] || "$py" -m venv --system-site-packages "$dir"
    "$dir/bin/python" -m pip install -q --upgrade "$@"
    echo "$dir/bin/python"
}
opt=$(build optimum optimum-onnx)
genai=$(build genai onnxruntime-genai)
echo "export SQDEPLOY_OPTIMUM_PYTHON=$opt"
echo "export SQDEPLOY_GENAI_PYTHON=$genai"
