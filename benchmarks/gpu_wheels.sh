#!/usr/bin/env bash
# Fetches, as wheels into .whl/ (git-ignored), the Python packages that
# addernet_jax needs and the device machine's image lacks, for its Python
# (3.12, x86-64 Linux), from the repository root, where the package index is
# reachable:
#
#     bash benchmarks/gpu_wheels.sh [EXTRA_REQUIREMENT ...]
#
# Then name `.whl` in the device call's `carry`; gpu_diagnose.sh and
# gpu_session.sh install them (benchmarks/gpu_prepare.sh). Default: the
# packages imported by train_lib and the benchmarks that the image lacked
# when last read (ml_collections; tensorboardX for train.py's logs). Add
# e.g. `grain array_record dm-tree` for the streaming (ImageNet) pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PYTHON:-python3}
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
for requirement in "ml_collections>=1.0.0" "tensorboardX>=2.6" "$@"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .whl "$requirement"
done
ls -l .whl
