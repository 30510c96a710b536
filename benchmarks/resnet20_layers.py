"""The adder layers of CIFAR ResNet-20, shared by the benchmark scripts.

Plain Python (no JAX, no PyTorch), so every benchmark can import it. The stem
convolution and the classifier are multiplication layers and are not listed.
"""

from __future__ import annotations

# (name, count in the network, h_in, w_in, cin, cout, k, stride, pad), with
# PyTorch's symmetric padding as in the official model.
RESNET20_LAYERS = [
    ("s1_3x3_16-16", 6, 32, 32, 16, 16, 3, 1, 1),
    ("s2_3x3_16-32_s2", 1, 32, 32, 16, 32, 3, 2, 1),
    ("s2_3x3_32-32", 5, 16, 16, 32, 32, 3, 1, 1),
    ("s2_1x1_16-32_s2", 1, 32, 32, 16, 32, 1, 2, 0),
    ("s3_3x3_32-64_s2", 1, 16, 16, 32, 64, 3, 2, 1),
    ("s3_3x3_64-64", 5, 8, 8, 64, 64, 3, 1, 1),
    ("s3_1x1_32-64_s2", 1, 16, 16, 32, 64, 1, 2, 0),
]


def layer_shapes(batch: int, layer) -> dict:
  """Padded-input, filter and output shapes of one RESNET20_LAYERS entry."""
  _, _, h, w, cin, cout, k, s, pad = layer
  hp, wp = h + 2 * pad, w + 2 * pad
  ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
  return {"xp": (batch, hp, wp, cin), "w": (k, k, cin, cout),
          "y": (batch, ho, wo, cout), "strides": (s, s),
          "macs": batch * ho * wo * k * k * cin * cout}


def selected_layers(names: str, parser=None) -> list:
  """The RESNET20_LAYERS entries named in `names` (comma-separated; empty:
  all). An unknown name is an error listing the valid ones (through
  `parser.error` when given, else ValueError): it was ignored silently."""
  wanted = [n for n in names.split(",") if n] if names else []
  known = [layer[0] for layer in RESNET20_LAYERS]
  unknown = sorted(set(wanted) - set(known))
  if unknown:
    message = f"unknown --layers {unknown}; choose from {known}"
    if parser is not None:
      parser.error(message)
    raise ValueError(message)
  return [layer for layer in RESNET20_LAYERS
          if not wanted or layer[0] in wanted]
