# Sourced by gpu_diagnose.sh and gpu_session.sh (bash): makes the device
# machine's Python ready for this checkout.
#
# The device image has JAX, Flax, Optax, Orbax, chex and absl but not
# ml_collections (which train_lib needs) nor tensorboardX; nothing can be
# downloaded there. `bash benchmarks/gpu_wheels.sh` fetches them as wheels
# into .whl/ beforehand (on a machine with the package index); the device
# call names `.whl` in `carry`. The project itself is not installed there:
# `addernet_jax` imports from this checkout (PYTHONPATH), kernels included.

# gpu_prepare SCRATCH: installs the wheels in $WHEELS (default .whl), if
# any, under SCRATCH/site; puts the checkout and that folder on PYTHONPATH;
# then checks that what the benchmarks import imports, printing the failure
# and its remedy if not (status 1).
gpu_prepare() {
  local site=$1/site wheels=${WHEELS:-.whl} installed=""
  if compgen -G "$wheels/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl; then
      installed=":$site"
      echo "gpu_prepare: installed $(compgen -G "$wheels/*.whl" | wc -l) carried wheels under $site"
    else
      echo "gpu_prepare: installing the carried wheels in $wheels/ failed"
    fi
  fi
  export PYTHONPATH="$PWD$installed${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PY" -c "import addernet_jax.train_lib, addernet_jax.kernels.dispatch"; then
    echo "gpu_prepare: PREFLIGHT FAILED: the benchmarks cannot import the" \
         "project (see the error above). A missing package: run" \
         "'bash benchmarks/gpu_wheels.sh' where the package index is" \
         "reachable and name .whl in the device call's carry."
    return 1
  fi
  echo "gpu_prepare: addernet_jax and its kernels import"
}
