"""The shipped training configs: `python train.py --config configs/NAME.py`."""

import importlib
import pathlib

import ml_collections


def shipped_configs() -> dict[str, ml_collections.ConfigDict]:
  """Each config file's `get_config()` in this folder, by module name: the
  fields train.py and eval.py know (what
  `addernet_jax.cli.unknown_config_fields` compares a user's config with)."""
  configs = {}
  for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
    module = importlib.import_module(f"{__name__}.{path.stem}")
    if hasattr(module, "get_config"):
      configs[path.stem] = module.get_config()
  return configs
