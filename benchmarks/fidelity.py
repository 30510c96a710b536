"""One training step from the official ResNet-20 checkpoint against float64.

    python benchmarks/fidelity.py --data_dir DIR \
        --images 64 [--kernels] [--out fidelity.json]

(DIR holds ResNet20-AdderNet.pth, the official release, and
cifar10_test_lossless_297.npz, CIFAR-10 test images with the official logits.)

The truth is the official method (unfold + broadcast forward, the official
backward with its gradient normalisation, `torch.optim.SGD(lr, momentum 0.9,
weight_decay 5e-4)`, PyTorch BatchNorm) run in float64; the same code in
float32 is the reference error ("official float32"), and ours is
`addernet_jax` in float32 (the ResNet-20 of `models.get_model`, the optimiser
of `optim.make_optimizer`). All start from the official checkpoint and take one
training-mode step on the first `--images` CIFAR-10 test images of
`cifar10_test_lossless_297.npz`. Reported, each as the relative L2 distance to
the float64 truth:

- per adder layer, given the exact (float64) input: the forward output
  centred per channel (what the following BatchNorm keeps), the input
  gradient and the filter gradient given the exact output gradient;
- per parameter, the whole step's gradient (adder filters as the official
  backward returns them: scaled to norm eta*sqrt(k)) and parameter update;
- per BatchNorm, the change of its running mean and running variance.

Needs PyTorch (the comparison baseline, not a dependency of addernet_jax).
`tests/test_fidelity.py` runs the same comparison on fewer images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # pragma: no cover - only where torch is absent.
  torch = None

CIFAR_MEAN = np.array((0.4914, 0.4822, 0.4465))
CIFAR_STD = np.array((0.2023, 0.1994, 0.2010))
CHECKPOINT = "ResNet20-AdderNet.pth"
IMAGES = "cifar10_test_lossless_297.npz"
ETA = 0.2
# The official recipe: SGD lr 0.1 with the cosine at its first epoch.
CONFIG = {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
          "eta": ETA, "num_epochs": 399, "num_train_steps": 0}


def official_lr() -> float:
  """The official main.py's learning rate in epoch 1 of 400."""
  return 0.05 * (1 + math.cos(math.pi * 1 / 400))


def rel(a, b) -> float:
  """||a - b|| / ||b||, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def centred(y: np.ndarray, axis) -> np.ndarray:
  y = np.asarray(y, np.float64)
  return y - y.mean(axis=axis, keepdims=True)


def load_inputs(data_dir: Path, num_images: int):
  """(torch state_dict, normalised images NCHW float64, labels int64)."""
  state = torch.load(data_dir / CHECKPOINT, map_location="cpu",
                     weights_only=True)
  state = {k[len("module."):] if k.startswith("module.") else k: v
           for k, v in state.items()}
  data = np.load(data_dir / IMAGES)
  images = data["images"][:num_images].astype(np.float64) / 255.0
  images = ((images - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2)
  labels = data["labels"][:num_images].astype(np.int64)
  return state, np.ascontiguousarray(images), labels


# ------------------------------------------------------- the official side --

if torch is not None:
  from benchmarks.official_torch import adder2d  # noqa: E402

  class OfficialAdder2d(nn.Module):
    """The official `adder.adder2d` (parameter `adder`, no bias)."""

    def __init__(self, cin, cout, k, stride=1, padding=0):
      super().__init__()
      self.stride, self.padding = stride, padding
      self.adder = nn.Parameter(torch.zeros(cout, cin, k, k))

    def forward(self, x):
      return adder2d(x, self.adder, self.stride, self.padding)

  class OfficialBlock(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1 = OfficialAdder2d(cin, planes, 3, stride, 1)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = OfficialAdder2d(planes, planes, 3, 1, 1)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or cin != planes:
        self.downsample = nn.Sequential(
            OfficialAdder2d(cin, planes, 1, stride, 0), nn.BatchNorm2d(planes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      residual = x if self.downsample is None else self.downsample(x)
      return F.relu(out + residual)

  class OfficialResNet20(nn.Module):
    """The official resnet20.py, module names as in its checkpoint."""

    def __init__(self, num_classes=10):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      cin = 16
      for stage, planes in enumerate((16, 32, 64)):
        blocks = []
        for b in range(3):
          stride = 2 if stage > 0 and b == 0 else 1
          blocks.append(OfficialBlock(cin, planes, stride))
          cin = planes
        setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      self.fc = nn.Conv2d(64, num_classes, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(num_classes)

    def forward(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      x = self.layer3(self.layer2(self.layer1(x)))
      x = F.avg_pool2d(x, 8, stride=1)
      return self.bn2(self.fc(x)).flatten(1)


def official_step(state: dict, images: np.ndarray, labels: np.ndarray,
                  dtype, capture: bool = False) -> dict:
  """One official training step in `dtype` (torch.float64 or float32).

  Returns numpy float64 dicts keyed by official names: `grads` (as the
  official backward leaves them in `.grad`), `updates` (new - old
  parameters), `stats` (new - old running_mean / running_var), and with
  `capture`, `layers`: per adder module its input, output, filter, output
  gradient, the official backward's input and filter gradients (what the
  layer alone passes back), stride and padding.
  """
  model = OfficialResNet20()
  missing, unexpected = model.load_state_dict(state, strict=False)
  odd = [k for k in missing + unexpected if "num_batches_tracked" not in k]
  if odd:
    raise ValueError(f"checkpoint does not fit the official ResNet-20: {odd}")
  model = model.to(dtype).train()
  captured: dict[str, dict] = {}
  if capture:
    def alias_input(mod, inputs):
      # A node of its own, so that its gradient is this layer's alone (a
      # block's input also feeds its shortcut).
      return (inputs[0].view_as(inputs[0]),)

    def record(entry: dict, key: str):
      return lambda g: entry.__setitem__(key, g.detach().numpy().copy())

    for name, module in model.named_modules():
      if isinstance(module, OfficialAdder2d):
        def hook(mod, inputs, output, name=name):
          entry = {"x": inputs[0].detach().numpy().copy(),
                   "y": output.detach().numpy().copy(),
                   "w": mod.adder.detach().numpy().copy(),
                   "stride": mod.stride, "padding": mod.padding}
          captured[name] = entry
          output.register_hook(record(entry, "g"))
          inputs[0].register_hook(record(entry, "dx"))
          mod.adder.register_hook(record(entry, "dw"))
        module.register_forward_pre_hook(alias_input)
        module.register_forward_hook(hook)
  params = dict(model.named_parameters())
  before = {k: p.detach().clone() for k, p in params.items()}
  buffers = {k: b.detach().clone() for k, b in model.named_buffers()
             if k.endswith(("running_mean", "running_var"))}
  opt = torch.optim.SGD(model.parameters(), lr=official_lr(), momentum=0.9,
                        weight_decay=5e-4)
  opt.zero_grad()
  x = torch.from_numpy(images).to(dtype)
  loss = F.cross_entropy(model(x), torch.from_numpy(labels))
  loss.backward()
  loss = loss.item()
  grads = {k: p.grad.detach().double().numpy().copy()
           for k, p in params.items()}
  opt.step()
  updates = {k: (p.detach() - before[k]).double().numpy()
             for k, p in params.items()}
  new_buffers = dict(model.named_buffers())
  stats = {k: (new_buffers[k].detach() - b).double().numpy()
           for k, b in buffers.items()}
  return {"loss": loss, "grads": grads, "updates": updates,
          "stats": stats, "layers": captured}


def official_layer_f32(entry: dict) -> dict:
  """The official float32 forward, input gradient and (normalised) filter
  gradient of one adder layer on its exact float64 input / output gradient."""
  x = torch.from_numpy(entry["x"]).float().requires_grad_(True)
  w = torch.from_numpy(entry["w"]).float().requires_grad_(True)
  y = adder2d(x, w, entry["stride"], entry["padding"])
  y.backward(torch.from_numpy(entry["g"]).float())
  return {"y": y.detach().double().numpy(), "dx": x.grad.double().numpy(),
          "dw": w.grad.double().numpy()}


# ------------------------------------------------------------- our side --

def to_flax(named: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Official names -> {(collection, *flax path): array in our layout}."""
  from addernet_jax import convert  # pylint: disable=g-import-not-at-top
  out = {}
  for key, value in named.items():
    mapped = convert.torch_key_to_flax(key, np.asarray(value, np.float64))
    if mapped is not None:
      collection, path, array = mapped
      out[(collection, *path)] = array
  return out


def normalise_adder_grads(grads: dict[tuple, np.ndarray]) -> dict:
  """Our raw adder filter gradients scaled as the official backward does
  (eta * sqrt(k) / ||g||); other gradients unchanged."""
  from addernet_jax import layers  # pylint: disable=g-import-not-at-top
  out = {}
  for path, g in grads.items():
    g = np.asarray(g, np.float64)
    if path[-1] == layers.ADDER_KERNEL:
      g = g * ETA * math.sqrt(g.size) / max(np.linalg.norm(g), 1e-12)
    out[path] = g
  return out


def our_step(state: dict, images: np.ndarray, labels: np.ndarray,
             implementation: str | None = "xla") -> dict:
  """One step of addernet_jax in float32, results keyed like `to_flax`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from addernet_jax import convert, optim  # pylint: disable=g-import-not-at-top
  from addernet_jax.models import get_model  # pylint: disable=g-import-not-at-top

  variables = convert.convert_state_dict(
      {k: v.numpy() for k, v in state.items()}, "resnet20")
  model = get_model("resnet20", num_classes=10, conv="adder",
                    implementation=implementation)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optim.make_optimizer(CONFIG, params, steps_per_epoch=1)

  @jax.jit
  def step(params, batch_stats, x, y):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return loss, grads, updates, new_stats

  x = jnp.asarray(images.transpose(0, 2, 3, 1), jnp.float32)
  loss, grads, updates, new_stats = step(params, batch_stats, x,
                                         jnp.asarray(labels, jnp.int32))

  def flat(tree, collection):
    return {(collection, *k): np.asarray(v, np.float64)
            for k, v in traverse_util.flatten_dict(
                jax.device_get(tree)).items()}
  stats = jax.tree.map(lambda a, b: np.asarray(a, np.float64)
                       - np.asarray(b, np.float64), new_stats, batch_stats)
  return {"loss": float(loss),
          "grads": normalise_adder_grads(flat(grads, "params")),
          "updates": flat(updates, "params"),
          "stats": flat(stats, "batch_stats")}


_LAYER_FNS: dict = {}


def _layer_fn(stride: int, padding: int, implementation: str):
  """Jitted (x, w, g) -> (y, dx, dw) of `ops.adder_conv`, one per setting."""
  key = (stride, padding, implementation)
  if key not in _LAYER_FNS:
    import jax  # pylint: disable=g-import-not-at-top
    from addernet_jax import ops  # pylint: disable=g-import-not-at-top

    def fn(x, w, g):
      y, vjp = jax.vjp(lambda a, b: ops.adder_conv(
          a, b, strides=stride, padding=((padding, padding),) * 2,
          implementation=implementation), x, w)
      return (y, *vjp(g))
    _LAYER_FNS[key] = jax.jit(fn)
  return _LAYER_FNS[key]


def our_layer(entry: dict, forward: Callable | None = None,
              implementation: str = "xla") -> dict:
  """Our float32 forward (or `forward(xp, w, strides)`), input gradient and
  (normalised) filter gradient of one layer, on the exact float64 data."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(entry["x"].transpose(0, 2, 3, 1), jnp.float32)
  w = jnp.asarray(entry["w"].transpose(2, 3, 1, 0), jnp.float32)
  g = jnp.asarray(entry["g"].transpose(0, 2, 3, 1), jnp.float32)
  s, p = entry["stride"], entry["padding"]
  y, dx, dw = _layer_fn(s, p, implementation)(x, w, g)
  if forward is not None:
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    y = forward(xp, w, (s, s))
  dw = np.asarray(dw, np.float64).transpose(3, 2, 0, 1)
  dw = dw * ETA * math.sqrt(dw.size) / np.linalg.norm(dw)
  return {"y": np.asarray(y, np.float64).transpose(0, 3, 1, 2),
          "dx": np.asarray(dx, np.float64).transpose(0, 3, 1, 2), "dw": dw}


# ---------------------------------------------------------- comparisons --

def layer_report(truth_layers: dict, forwards: dict[str, Callable | None]
                 ) -> list[dict]:
  """Per adder layer: centred forward, dx and dw errors vs float64 for the
  official float32 code and for each of ours (`forwards`: label -> forward
  function, None for `ops.adder_conv`'s XLA path)."""
  rows = []
  for name, entry in truth_layers.items():
    y64 = entry["y"]
    c64 = centred(y64, (0, 2, 3))
    # The official float64 backward's own, given the exact output gradient.
    dx64, dw64 = entry["dx"], entry["dw"]
    off = official_layer_f32(entry)
    row = {"layer": name, "shape": list(entry["w"].shape),
           "stride": entry["stride"],
           "y_range": [float(y64.min()), float(y64.max())],
           "y_channel_std": [float(y64.std((0, 2, 3)).min()),
                             float(y64.std((0, 2, 3)).max())],
           "official_f32": {"y": rel(centred(off["y"], (0, 2, 3)), c64),
                            "dx": rel(off["dx"], dx64),
                            "dw": rel(off["dw"], dw64)}}
    for label, forward in forwards.items():
      ours = our_layer(entry, forward)
      row[label] = {"y": rel(centred(ours["y"], (0, 2, 3)), c64),
                    "dx": rel(ours["dx"], dx64), "dw": rel(ours["dw"], dw64)}
    rows.append(row)
  return rows


def step_report(truth: dict, official: dict, ours: dict) -> dict:
  """Per parameter / BatchNorm: relative L2 distance to the float64 truth of
  the official float32 step and of ours."""
  out = {}
  for kind in ("grads", "updates", "stats"):
    want = to_flax(truth[kind])
    off = to_flax(official[kind])
    rows = {}
    for path in sorted(want):
      key = "/".join(path[1:])
      rows[key] = {"official_f32": rel(off[path], want[path]),
                   "ours": rel(ours[kind][path], want[path])}
    out[kind] = rows
  return out


def run(data_dir: Path, num_images: int, kernels: bool = False,
        implementation: str = "xla") -> dict:
  """The whole comparison (see the module docstring) as a dict."""
  import jax  # pylint: disable=g-import-not-at-top
  state, images, labels = load_inputs(data_dir, num_images)
  t0 = time.perf_counter()
  truth = official_step(state, images, labels, torch.float64, capture=True)
  t1 = time.perf_counter()
  official = official_step(state, images, labels, torch.float32)
  t2 = time.perf_counter()
  ours = our_step(state, images, labels, implementation)
  t3 = time.perf_counter()
  forwards: dict[str, Callable | None] = {"ours": None}
  if kernels:
    from addernet_jax.kernels import gpu, tpu  # pylint: disable=g-import-not-at-top
    forwards["gpu_interpret"] = jax.jit(
        lambda xp, w, s: gpu.forward(xp, w, s, interpret=True),
        static_argnums=2)
    forwards["tpu_interpret"] = jax.jit(
        lambda xp, w, s: tpu.forward(xp, w, s, interpret=True),
        static_argnums=2)
  layers = layer_report(truth["layers"], forwards)
  return {
      "images": num_images, "date": datetime.date.today().isoformat(),
      "jax": jax.__version__, "torch": torch.__version__,
      "python": platform.python_version(),
      "cpu": platform.processor() or platform.machine(),
      "loss": {"truth": truth["loss"], "official_f32": official["loss"],
               "ours": ours["loss"]},
      "seconds": {"official_f64": round(t1 - t0, 1),
                  "official_f32": round(t2 - t1, 1),
                  "ours_incl_compile": round(t3 - t2, 1)},
      "layers": layers, **step_report(truth, official, ours)}


def worst(rows: dict) -> dict:
  """Largest error over the rows, per side."""
  return {side: max(r[side] for r in rows.values())
          for side in ("official_f32", "ours")}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", type=Path, required=True,
                      help="folder with ResNet20-AdderNet.pth and "
                      "cifar10_test_lossless_297.npz")
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--kernels", action="store_true",
                      help="also the Pallas forwards in interpret mode")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if torch is None:
    sys.exit("fidelity.py needs PyTorch (the float64 truth is the official "
             "method in PyTorch)")
  torch.set_num_threads(max(1, torch.get_num_threads()))
  result = run(args.data_dir, args.images, kernels=args.kernels)
  labels = [k for k in result["layers"][0] if k not in (
      "layer", "shape", "stride", "y_range", "y_channel_std")]
  print(f"# {args.images} images; loss {result['loss']}; {result['seconds']}")
  print(f"{'layer':22s} {'y range':>17s} {'ch std':>11s} "
        + " ".join(f"{lab[:13]:>13s} y/dx/dw" for lab in labels))
  for row in result["layers"]:
    print(f"{row['layer']:22s} {row['y_range'][0]:8.0f} {row['y_range'][1]:8.0f}"
          f" {row['y_channel_std'][0]:5.1f} {row['y_channel_std'][1]:5.1f} "
          + " ".join(f"{row[lab]['y']:.1e}/{row[lab]['dx']:.1e}/"
                     f"{row[lab]['dw']:.1e}" for lab in labels))
  for kind in ("grads", "updates", "stats"):
    print(f"# {kind}: worst {worst(result[kind])}")
    for key, r in result[kind].items():
      flag = "  <-- over 2x" if r["ours"] > 2 * r["official_f32"] else ""
      print(f"  {key:40s} official_f32 {r['official_f32']:.2e}  "
            f"ours {r['ours']:.2e}{flag}")
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
