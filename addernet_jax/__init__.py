"""AdderNet (CVPR 2020) in JAX: the adder convolution, Flax models, the
adaptive learning rate and the training application."""

import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys


def _kernels_from_source_checkout() -> None:
  """Makes `addernet_jax.kernels` importable from a source checkout.

  The Pallas kernels live in the repository's top-level `kernels/` folder;
  an installed package maps them to `addernet_jax.kernels`, a checkout on
  `sys.path` (e.g. `python train.py` from a clone, or a machine where the
  project is not installed) does not, which left the GPU and TPU on the XLA
  path."""
  package = _pathlib.Path(__file__).resolve().parent
  kernels = package.parent / "kernels"
  name = f"{__name__}.kernels"
  if (name in _sys.modules or (package / "kernels").exists()
      or not (kernels / "dispatch.py").is_file()):
    return
  spec = _importlib_util.spec_from_file_location(
      name, kernels / "__init__.py", submodule_search_locations=[str(kernels)])
  module = _importlib_util.module_from_spec(spec)
  _sys.modules[name] = module
  spec.loader.exec_module(module)
  setattr(_sys.modules[__name__], "kernels", module)


_kernels_from_source_checkout()

# `import addernet_jax` then `addernet_jax.ops...` (as the README writes it):
# submodules import on first use, so the package itself stays light.
_LAZY_SUBMODULES = ("attacks", "checkpoint", "convert", "data", "distill",
                    "eval_lib", "export", "figures", "layers", "models",
                    "opcount", "ops", "optim", "parallel", "preemption",
                    "progress", "reference", "sr", "torch_pickle",
                    "train_lib")


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES:
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
