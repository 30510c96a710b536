"""The seed release's adder method (unfold + broadcast), in PyTorch, for timing.

    python benchmarks/official_torch.py --batch 256 --out official_torch.json

Re-implements the method of the official AdderNet release for comparison on
the same GPU: `unfold` the input to a (k, n*h*w) patch matrix, broadcast it
against the (cout, k) filters into a (cout, k, n*h*w) difference tensor, and
reduce; the backward materialises the same tensor twice (full-precision dw,
HardTanh-clipped dx) and rescales dw by eta * sqrt(numel) / ||dw|| (eta 0.2),
as the release does. Measures, with CUDA events (median of --reps after
--warmup), each ResNet-20 adder layer's forward and forward+backward time and
peak memory (`torch.cuda.max_memory_allocated`), and a whole ResNet-20
training step (forward, backward, SGD momentum 0.9, weight decay 5e-4) for the
adder network and the identical CNN. Prints one JSON object (last line).
Runs on the CPU too (`--device cpu --batch 4`), for checking the script only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # pragma: no cover - only where torch is absent.
  torch = None

from benchmarks.resnet20_layers import RESNET20_LAYERS  # noqa: E402

ETA = 0.2


if torch is not None:

  class _AdderFunction(torch.autograd.Function):
    """-sum_k |W[o,k] - X[k,m]| over a materialised (cout, k, m) tensor."""

    @staticmethod
    def forward(ctx, w_col, x_col):
      ctx.save_for_backward(w_col, x_col)
      return -(w_col.unsqueeze(2) - x_col.unsqueeze(0)).abs().sum(1)

    @staticmethod
    def backward(ctx, grad_out):
      w_col, x_col = ctx.saved_tensors
      diff = x_col.unsqueeze(0) - w_col.unsqueeze(2)
      grad_w = (diff * grad_out.unsqueeze(1)).sum(2)
      grad_w = (grad_w / grad_w.norm(p=2).clamp(min=1e-12)
                * math.sqrt(w_col.numel()) * ETA)
      grad_x = (-diff.clamp(-1, 1) * grad_out.unsqueeze(1)).sum(0)
      return grad_w, grad_x

  def adder2d(x, w, stride: int, padding: int):
    """NCHW input, OIHW filters -> NCHW output, the release's unfold method."""
    n, _, h, w_in = x.shape
    cout, _, kh, kw = w.shape
    ho = (h - kh + 2 * padding) // stride + 1
    wo = (w_in - kw + 2 * padding) // stride + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # n, k, L
    cols = cols.permute(1, 2, 0).reshape(cols.shape[1], -1)     # k, L*n
    out = _AdderFunction.apply(w.reshape(cout, -1), cols)       # cout, L*n
    return out.reshape(cout, ho, wo, n).permute(3, 0, 1, 2).contiguous()

  class Adder2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0):
      super().__init__()
      self.stride, self.padding = stride, padding
      self.weight = nn.Parameter(torch.randn(cout, cin, k, k))

    def forward(self, x):
      return adder2d(x, self.weight, self.stride, self.padding)

  def _layer(kind, cin, cout, k, stride, padding):
    if kind == "adder":
      return Adder2d(cin, cout, k, stride, padding)
    return nn.Conv2d(cin, cout, k, stride, padding, bias=False)

  class BasicBlock(nn.Module):
    def __init__(self, kind, cin, cout, stride):
      super().__init__()
      self.conv1 = _layer(kind, cin, cout, 3, stride, 1)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = _layer(kind, cout, cout, 3, 1, 1)
      self.bn2 = nn.BatchNorm2d(cout)
      self.down = None
      if stride != 1 or cin != cout:
        self.down = nn.Sequential(_layer(kind, cin, cout, 1, stride, 0),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + (x if self.down is None else self.down(x)))

  class ResNet20(nn.Module):
    """The official CIFAR ResNet-20 (adder or multiplication layers)."""

    def __init__(self, kind="adder", num_classes=10):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for b in range(3):
          blocks.append(BasicBlock(kind, cin, cout, stride if b == 0 else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Conv2d(64, num_classes, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(num_classes)

    def forward(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      x = self.blocks(x)
      x = F.adaptive_avg_pool2d(x, 1)
      return self.bn2(self.fc(x)).flatten(1)


def _timer(device):
  """(start, stop) -> seconds; CUDA events on GPUs, perf_counter elsewhere."""
  if device.type == "cuda":
    def run(fn):
      start = torch.cuda.Event(enable_timing=True)
      stop = torch.cuda.Event(enable_timing=True)
      start.record()
      fn()
      stop.record()
      torch.cuda.synchronize()
      return start.elapsed_time(stop) / 1e3
  else:
    def run(fn):
      t0 = time.perf_counter()
      fn()
      return time.perf_counter() - t0
  return run


def _measure(fn, device, warmup, reps):
  """Median seconds, and on CUDA the peak bytes allocated (absolute, and above
  what was resident before: inputs, parameters) while running `fn()`."""
  timed = _timer(device)
  for _ in range(warmup):
    fn()
  if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
  times = [timed(fn) for _ in range(reps)]
  peak = None
  if device.type == "cuda":
    total = torch.cuda.max_memory_allocated()
    peak = {"peak_bytes": total, "peak_above_resident_bytes": total - base}
  return statistics.median(times), peak


def check(device) -> float:
  """Max abs difference of adder2d against a cdist (p=1) formulation."""
  g = torch.Generator().manual_seed(0)
  x = torch.randn(3, 5, 9, 7, generator=g).to(device)
  w = torch.randn(6, 5, 3, 3, generator=g).to(device)
  y = adder2d(x, w, 2, 1)
  cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # n, L, k
  ref = -torch.cdist(cols.double(), w.reshape(6, -1).double().unsqueeze(0)
                     .expand(3, -1, -1), p=1)                   # n, L, cout
  ref = ref.transpose(1, 2).reshape(y.shape)
  return float((y.double() - ref).abs().max())


def bench_layers(batch, device, warmup, reps):
  rows = []
  for name, count, h, w_in, cin, cout, k, s, pad in RESNET20_LAYERS:
    x = torch.randn(batch, cin, h, w_in, device=device, requires_grad=True)
    layer = Adder2d(cin, cout, k, s, pad).to(device)
    g = torch.randn_like(layer(x))
    row = {"layer": name, "count": count}
    try:
      with torch.no_grad():
        row["forward_s"], row["forward_memory"] = _measure(
            lambda: layer(x), device, warmup, reps)

      def fwd_bwd():
        x.grad = None
        layer.weight.grad = None
        layer(x).backward(g)
      row["fwd_bwd_s"], row["fwd_bwd_memory"] = _measure(
          fwd_bwd, device, warmup, reps)
    except RuntimeError as e:  # out of memory: report it, keep going.
      row["error"] = str(e).splitlines()[0]
      if device.type == "cuda":
        torch.cuda.empty_cache()
    rows.append(row)
    del x, layer, g
  return rows


def bench_step(kind, batch, device, warmup, reps):
  model = ResNet20(kind).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                        weight_decay=5e-4)
  images = torch.randn(batch, 3, 32, 32, device=device)
  labels = torch.randint(0, 10, (batch,), device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()
  try:
    t, peak = _measure(step, device, warmup, reps)
    return {"model": f"resnet20_{kind}", "batch": batch, "step_s": t,
            "memory": peak}
  except RuntimeError as e:
    return {"model": f"resnet20_{kind}", "batch": batch,
            "error": str(e).splitlines()[0]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--device", default=None, help="cuda (default if "
                      "available) or cpu")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--skip_layers", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if torch is None:
    sys.exit("official_torch.py needs PyTorch (pip install torch); it is the "
             "comparison baseline, not part of addernet_jax.")
  device = torch.device(args.device or
                        ("cuda" if torch.cuda.is_available() else "cpu"))
  torch.backends.cudnn.benchmark = True
  # The official method has no matmuls; keep the CNN baseline in full FP32.
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  result = {
      "method": "official unfold+broadcast (PyTorch re-implementation)",
      "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or "cpu"),
      "torch": torch.__version__, "python": platform.python_version(),
      "date": time.strftime("%Y-%m-%d"), "batch": args.batch,
      "check_max_abs_err_vs_cdist": check(device),
  }
  if not args.skip_layers:
    result["layers"] = bench_layers(args.batch, device, args.warmup, args.reps)
  result["steps"] = [bench_step(kind, args.batch, device, args.warmup,
                                args.reps) for kind in ("adder", "mult")]
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
