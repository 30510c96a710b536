"""jax.export round trips: the file runs with JAX alone and gives the model's
logits, for any batch size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from addernet_jax import data as data_lib
from addernet_jax import export
from addernet_jax import models

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter whose path does not reach this repository.
_LOAD_AND_CALL = r"""
import sys, numpy as np, jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(exported.call(x)))
assert not any(m.startswith("addernet_jax") for m in sys.modules)
print(exported.in_avals, exported.platforms)
"""


def _call_without_the_repo(path: Path, x: np.ndarray, tmp: Path) -> np.ndarray:
  np.save(tmp / "x.npy", x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-c", _LOAD_AND_CALL, str(path), str(tmp / "x.npy"),
       str(tmp / "y.npy")], cwd=tmp, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(tmp / "y.npy")


@pytest.fixture(scope="module")
def lenet():
  info = data_lib.dataset_info("mnist")
  model = models.get_model("lenet5_bn", num_classes=10, conv="adder",
                           implementation="xla")
  variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)),
                         train=False)
  # Non-trivial running statistics, so that inference mode is visible.
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(
                   lambda s: s + 0.5 * jnp.abs(jax.random.normal(
                       jax.random.PRNGKey(4), s.shape)),
                   variables["batch_stats"])}
  return model, variables, info


def test_round_trip_gives_the_models_logits_at_any_batch(lenet, tmp_path):
  model, variables, info = lenet
  exported = export.export_model(model, variables, info,
                                 platforms=("cpu", "cuda"))
  assert exported.platforms == ("cpu", "cuda")
  path = export.save(exported, tmp_path / "lenet.jaxexport")
  rng = np.random.default_rng(0)
  fn = export.pixels_to_logits(model, variables, info)
  for batch in (1, 5):
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    expected = np.asarray(jax.jit(fn)(x))
    # The reference is the model itself on normalised pixels.
    direct = model.apply(variables, (x - 0.1307) / 0.3081, train=False)
    np.testing.assert_allclose(expected, direct, rtol=1e-5, atol=1e-3)
    got = _call_without_the_repo(path, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
  again = export.load(path).call(x)
  np.testing.assert_allclose(np.asarray(again), expected, rtol=1e-6,
                             atol=1e-4)


def test_bad_inputs_get_clear_errors(lenet, tmp_path):
  model, variables, info = lenet
  with pytest.raises(ValueError, match="platforms must be among"):
    export.export_model(model, variables, info, platforms=("gpu42",))
  (tmp_path / "junk").write_bytes(b"not an exported model")
  with pytest.raises(ValueError, match="not a jax.export file"):
    export.load(tmp_path / "junk")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.load(tmp_path / "missing")
  with pytest.raises(ValueError, match="is a directory"):
    export.save(export.export_model(model, variables, info,
                                    platforms=("cpu",)), tmp_path)


def _official_inputs(shared: Path):
  npz = shared / "official-resnet20" / "cifar10_test_lossless_297.npz"
  pth = shared / "official-resnet20" / "ResNet20-AdderNet.pth"
  if not (npz.is_file() and pth.is_file()):
    pytest.skip(f"official checkpoint or test images absent in {shared}")
  return pth, np.load(npz)


@pytest.mark.slow
def test_cli_exports_the_official_checkpoint(shared_data, tmp_path):
  """The command exports the official ResNet-20; the file alone reproduces
  the official PyTorch logits on real test images."""
  pth, data = _official_inputs(shared_data)
  out = tmp_path / "resnet20.jaxexport"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "addernet_jax.export", "--config",
         "configs/cifar10_resnet20.py", f"--torch_checkpoint={pth}",
         f"--output={out}"]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["platforms"] == ["cpu", "cuda"] and out.is_file()
  x = data["images"][:32].astype(np.float32) / 255.0
  logits = _call_without_the_repo(out, x, tmp_path)
  official = data["official_logits"][:32]
  np.testing.assert_array_equal(logits.argmax(-1), official.argmax(-1))
  assert np.abs(logits - official).max() < 2e-2
  bad = subprocess.run(cmd[:-2] + [f"--torch_checkpoint={tmp_path}/no.pth",
                                   f"--output={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith("error: torch "
                                                        "checkpoint")
  assert "Traceback" not in bad.stderr
