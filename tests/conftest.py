"""Shared test helpers: the location of ../shared/data beside the checkout,
a walk over every equation of a jaxpr, the order of the test files."""

from pathlib import Path
from typing import Iterator

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def all_equations(jaxpr) -> Iterator:
  """Every equation of `jaxpr` (a Jaxpr or ClosedJaxpr), also those inside
  the bodies of jit calls, loops, conditionals and custom derivatives."""
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from all_equations(sub)


@pytest.fixture
def shared_data() -> Path:
  """../shared/data, or a skip saying why it is needed."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside a "
                f"developer checkout, not in a user's clone)")
  return SHARED_DATA


# The longest test files (work seconds of a two-worker run on a 2-core CPU,
# 2026-12-01). pytest-xdist's `--dist loadfile` hands files out in the order
# it is given, so the longest go first and the short ones fill in at the end
# (its default order, most tests first, left two 130-160 s files for last).
LONGEST_FIRST = ("test_train.py", "test_sr.py", "test_models.py",
                 "test_distill.py", "test_multihost.py", "test_configs.py",
                 "test_figures.py", "test_export.py", "test_eval.py",
                 "test_kernels_simt.py", "test_kernels.py",
                 "test_init_from.py", "test_nnx_bridge.py")


def pytest_configure(config):
  if config.pluginmanager.hasplugin("xdist"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
