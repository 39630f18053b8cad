#!/usr/bin/env bash
# Gather the wheels the GPU machines need for the ALST contender (they have no network) into .whl/ (git-ignored),
# to be named in the device call's `carry`:  bash bench/fetch_peer_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
cp ../shared/wheels/*.whl .whl/            # DeepSpeed 0.19.8 (built with DS_BUILD_OPS=0), pydantic & co, liger-kernel
# DeepSpeed also imports these at start-up; ArcticTraining's checkpoint-offload patch is read from its wheel.
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 -d .whl einops msgpack py-cpuinfo psutil nvidia-ml-py arctic-training==0.8.0
ls .whl
