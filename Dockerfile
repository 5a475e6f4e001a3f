# syntax=docker/dockerfile:1
# The orchestrator's container image, for the Kubernetes manifests in k8s/ (Ray head and workers, the RayJob
# submitter and the MLflow server): Ray 2.60.0 on Python 3.11, with the project installed.
#
#   CPU build:  docker build --build-arg DEVICE=cpu -t REGISTRY/orchestrator:0.1.0-ray2.60.0-cpu .
#   GPU build:  docker build --build-arg DEVICE=gpu -t REGISTRY/orchestrator:0.1.0-ray2.60.0-gpu .
#
# DEVICE picks both the Ray base image (rayproject/ray:2.60.0-py311 or its -gpu variant, which carries CUDA)
# and the torch build (PyTorch's CPU-only wheels, or the CUDA build named by TORCH_CUDA). Keep RAY_VERSION,
# the tag you push and rayVersion in k8s/base/*.yaml in step (tests/k8s checks the three agree).

ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG DEVICE=cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu

# BuildKit builds (and pulls) only the base stage DEVICE names.
FROM base-${DEVICE}

ARG RAY_VERSION
ARG DEVICE
ARG TORCH_VERSION=2.13.0
# CUDA flavour of the torch wheels for DEVICE=gpu (an index under https://download.pytorch.org/whl/); pick the
# one that matches the CUDA of the base image and your nodes' driver.
ARG TORCH_CUDA=cu128
ARG PSYCOPG2_VERSION=2.9.13

# A C++ compiler for DeepSpeed's just-in-time built ops (the base image runs as "ray", with sudo rights).
RUN sudo apt-get update \
 && sudo apt-get install -y --no-install-recommends g++ \
 && sudo rm -rf /var/lib/apt/lists/*

# torch first, from PyTorch's own index, so that the project's "torch>=2.4" finds it already installed.
RUN if [ "$DEVICE" = "gpu" ]; then index="https://download.pytorch.org/whl/${TORCH_CUDA}"; \
    else index="https://download.pytorch.org/whl/cpu"; fi \
 && pip install --no-cache-dir --index-url "$index" "torch==${TORCH_VERSION}"

# Then the project (`pip install .`) with ray and torch held where they are, plus what the MLflow server in
# k8s/base/mlflow.yaml needs: mlflow[auth] (Flask-WTF, for --app-name basic-auth) and psycopg2-binary (its
# PostgreSQL backend store).
COPY --chown=ray:users . /tmp/orchestrator-src
RUN cd /tmp/orchestrator-src \
 && printf 'ray==%s\ntorch==%s\n' "$RAY_VERSION" "$TORCH_VERSION" > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt . "psycopg2-binary==${PSYCOPG2_VERSION}" \
 && pip install --no-cache-dir -c /tmp/constraints.txt "mlflow[auth]==$(python -c 'import importlib.metadata as m; print(m.version("mlflow"))')" \
 && cd /home/ray && rm -rf /tmp/orchestrator-src /tmp/constraints.txt \
 && python -c "import ray, torch, mlflow, deepspeed, psycopg2, flask_wtf, orchestrator; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && orch --help > /dev/null

WORKDIR /home/ray
