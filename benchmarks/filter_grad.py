"""Filter-gradient formulations: speed and error against float64, per layer.

    python benchmarks/filter_grad.py [--batch 256] [--out filter_grad.json]

The adder filter gradient is `dw = corr(xp, g) - w * sum(g)`; only `corr`, an
ordinary convolution weight gradient, is expensive. For each ResNet-20 adder
layer this times candidate ways to compute it and gives each one's relative
L2 error against float64 NumPy on the same (BN-like, non-zero-mean) data:

- conv_highest: the VJP of `lax.conv_general_dilated` at Precision.HIGHEST
  (what `addernet_jax.reference.filter_grad` uses off the CPU);
- conv_default: the same at default precision (TF32 tensor cores on Ampere+:
  fast, about 1e-3 relative: not float32-faithful, listed as the bound);
- conv_3xtf32: three default-precision weight gradients of a hi/lo split of
  both operands (hi*hi + hi*lo + lo*hi), tensor cores at near-float32 error;
- taps_highest, taps_bf16x6: one `dot_general` per filter tap at HIGHEST, and
  with the BF16_BF16_F32_X6 dot algorithm (six bf16 tensor-core passes).

A candidate the backend does not support is reported with its error message.
Prints one JSON object (last line). On the CPU all run in float32 (a check of
the script, not a measurement worth reporting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from addernet_jax import reference  # noqa: E402
from benchmarks.resnet20_layers import layer_shapes, selected_layers  # noqa: E402
from benchmarks.timing import per_call_seconds  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def _conv_corr(xp, g, w_shape, strides, precision):
  def conv(kernel):
    return lax.conv_general_dilated(xp, kernel, strides, "VALID",
                                    dimension_numbers=DN, precision=precision)
  _, vjp = jax.vjp(conv, jnp.zeros(w_shape, jnp.float32))
  return vjp(g)[0]


def _split_tf32(a):
  """hi with a TF32 mantissa (10 bits), and the rest."""
  bits = lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFE000)
  hi = lax.bitcast_convert_type(bits, jnp.float32)
  return hi, a - hi


def _taps_corr(xp, g, w_shape, strides, precision):
  kh, kw, cin, cout = w_shape
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
  return jnp.stack([
      lax.dot_general(reference.tap_view(xp, i, j, g.shape[1:3], strides), g,
                      contract, precision=precision)
      for i in range(kh) for j in range(kw)]).reshape(kh, kw, cin, cout)


def candidates():
  def conv_3xtf32(xp, g, w_shape, strides):
    (xh, xl), (gh, gl) = _split_tf32(xp), _split_tf32(g)
    return sum(_conv_corr(a, b, w_shape, strides, lax.Precision.DEFAULT)
               for a, b in ((xh, gh), (xh, gl), (xl, gh)))
  bf16x6 = getattr(lax.DotAlgorithmPreset, "BF16_BF16_F32_X6", None)
  return {
      "conv_highest": lambda xp, g, ws, s: _conv_corr(
          xp, g, ws, s, lax.Precision.HIGHEST),
      "conv_default": lambda xp, g, ws, s: _conv_corr(
          xp, g, ws, s, lax.Precision.DEFAULT),
      "conv_3xtf32": conv_3xtf32,
      "taps_highest": lambda xp, g, ws, s: _taps_corr(
          xp, g, ws, s, lax.Precision.HIGHEST),
      "taps_bf16x6": lambda xp, g, ws, s: _taps_corr(xp, g, ws, s, bf16x6),
  }


def _time(fn, args, reps: int, rounds: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  return statistics.median(per_call_seconds(fn, args, reps=reps,
                                            rounds=rounds))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=None,
                      help="default 256 on accelerators, 4 on the CPU")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--layers", default="", help="comma-separated names")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  batch = args.batch or (4 if jax.default_backend() == "cpu" else 256)
  layers = selected_layers(args.layers, parser)
  rows = []
  rng = np.random.default_rng(0)
  for layer in layers:
    sh = layer_shapes(batch, layer)
    # BN-like input (positive mean after ReLU) and a zero-sum-ish gradient:
    # the cancellation that makes dw's precision matter.
    xp = np.maximum(rng.standard_normal(sh["xp"]) + 0.5, 0).astype(np.float32)
    g = (rng.standard_normal(sh["y"]) * 1e-3).astype(np.float32)
    x64, g64 = xp.astype(np.float64), g.astype(np.float64)
    kh, kw = sh["w"][:2]
    ho, wo = sh["y"][1:3]
    s = sh["strides"][0]
    want = np.stack([
        np.tensordot(x64[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s],
                     g64, axes=([0, 1, 2], [0, 1, 2]))
        for i in range(kh) for j in range(kw)]).reshape(sh["w"])
    row = {"layer": layer[0], "batch": batch}
    for name, fn in candidates().items():
      jitted = jax.jit(fn, static_argnums=(2, 3))
      call_args = (jnp.asarray(xp), jnp.asarray(g), sh["w"], sh["strides"])
      try:
        got = np.asarray(jitted(*call_args), np.float64)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        row[name] = {"s": _time(jitted, call_args, args.reps), "rel_err": err}
      except Exception as e:  # pylint: disable=broad-except
        row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = {"device": str(jax.devices()[0].device_kind),
            "backend": jax.default_backend(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
  print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
  return result


if __name__ == "__main__":
  main()
