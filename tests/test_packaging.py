"""The kernels install and import as `addernet_jax.kernels`, never as a
top-level `kernels` (a different package of that name exists on PyPI)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CHECK = r"""
import sys
import kernels
assert kernels.FOREIGN, "the foreign kernels module was replaced"
import addernet_jax.ops as ops
from addernet_jax.kernels import dispatch, gpu
ops._pallas_backend((2, 10, 10, 3), (3, 3, 3, 4), (1, 1), "float32")
assert sys.modules["kernels"] is kernels, sys.modules["kernels"]
assert not hasattr(kernels, "dispatch")
assert dispatch.__name__ == "addernet_jax.kernels.dispatch"
# Ours, wherever installed (the checkout's kernels/ for an editable install,
# site-packages/addernet_jax/kernels otherwise), never the foreign folder.
import addernet_jax.kernels as own
assert not gpu.__file__.startswith(sys.argv[1]), gpu.__file__
assert gpu.__file__.startswith(own.__path__[0]), (gpu.__file__, own.__path__)
print("ok")
"""


def test_a_foreign_kernels_package_is_left_alone(tmp_path):
  foreign = tmp_path / "kernels"
  foreign.mkdir()
  (foreign / "__init__.py").write_text("FOREIGN = True\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-c", _CHECK, str(foreign)], cwd=tmp_path,
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "ok", (
      result.stdout + result.stderr)


_FROM_CHECKOUT = r"""
import sys
# As on a machine where the project is not installed: no editable finder.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import addernet_jax
assert addernet_jax.__file__.startswith(sys.argv[1]), addernet_jax.__file__
from addernet_jax import ops
from addernet_jax.kernels import dispatch
import addernet_jax.kernels.gpu as gpu
assert addernet_jax.kernels.dispatch is dispatch
assert dispatch.__name__ == "addernet_jax.kernels.dispatch"
assert gpu.__file__.startswith(sys.argv[1] + "/kernels/"), gpu.__file__
assert ops._kernel_dispatch() is dispatch
assert "kernels" not in sys.modules
print("ok")
"""


def test_a_source_checkout_not_installed_imports_its_kernels(tmp_path):
  """`python train.py` from a clone, or the device machine (the project on
  PYTHONPATH only): the kernels must still load, else GPUs and TPUs run the
  XLA path."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-c", _FROM_CHECKOUT, str(ROOT)], cwd=tmp_path,
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "ok", (
      result.stdout + result.stderr)


@pytest.mark.slow
def test_the_wheel_has_no_top_level_kernels(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
       str(tmp_path), str(ROOT)], capture_output=True, text=True,
      timeout=300)
  if result.returncode != 0 and "setuptools" in result.stderr and (
      "Could not find" in result.stderr or "No matching" in result.stderr):
    pytest.skip("no package index reachable to fetch the build backend")
  assert result.returncode == 0, result.stderr[-2000:]
  (wheel,) = tmp_path.glob("*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  top_level = {name.split("/")[0] for name in names}
  assert "kernels" not in top_level, sorted(top_level)
  for module in ("__init__", "dispatch", "gpu", "tpu", "layout",
                 "mosaic_gpu"):
    assert f"addernet_jax/kernels/{module}.py" in names, module


def test_docs_and_code_point_only_to_files_a_clone_has():
  """Nothing a user gets points to a design file or a data folder that lives
  outside the repository (tests may read optional data beside a checkout)."""
  result = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
  if result.returncode != 0:
    pytest.skip("not a git checkout")
  offenders = []
  for name in result.stdout.split():
    if name.startswith("tests/") or not name.endswith((".py", ".md", ".sh",
                                                       ".toml")):
      continue
    text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
    for needle in ("DESIGN.md", "../shared"):
      if needle in text:
        offenders.append(f"{name}: {needle}")
  assert not offenders, offenders
  assert (ROOT / "docs" / "design.md").is_file()


def test_submodules_are_attributes_of_the_package():
  """`import addernet_jax` then `addernet_jax.ops.adder_conv_general_dilated`
  (as the README writes it) raised AttributeError; submodules now import on
  first use and the bare import stays light."""
  script = ("import sys, addernet_jax\n"
            "assert 'addernet_jax.ops' not in sys.modules\n"
            "assert callable(addernet_jax.ops.adder_conv_general_dilated)\n"
            "assert callable(addernet_jax.optim.scale_by_adaptive_lr)\n"
            "assert addernet_jax.models.get_model\n"
            "try:\n"
            "  addernet_jax.not_a_module\n"
            "except AttributeError as e:\n"
            "  assert 'not_a_module' in str(e)\n"
            "else:\n"
            "  raise AssertionError('no AttributeError')\n"
            "print('OK')\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr
