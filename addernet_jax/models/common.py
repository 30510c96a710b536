"""Pieces shared by the model definitions: the conv/dense factories and BN."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from addernet_jax import layers

ModuleDef = Any
CONV_KINDS = ("adder", "mult")


def conv_factory(conv: str, *, dtype: Any = jnp.float32,
                 implementation: str | None = None) -> Callable[..., nn.Module]:
  """The layer every non-stem, non-classifier convolution of a model uses.

  `conv="adder"` gives `layers.AdderConv` (N(0, 1) filters), `conv="mult"` the
  identical multiplication layer (`nn.Conv`, PyTorch's default init). Neither
  has a bias: a BatchNorm always follows.
  """
  if conv == "adder":
    return functools.partial(layers.AdderConv, use_bias=False, dtype=dtype,
                             implementation=implementation)
  if conv == "mult":
    return functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                             kernel_init=torch_default_init)
  raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")


def dense_factory(conv: str, *, dtype: Any = jnp.float32,
                  implementation: str | None = None) -> Callable[..., nn.Module]:
  """Fully connected twin of `conv_factory` (used by LeNet-5-BN)."""
  if conv == "adder":
    return functools.partial(layers.AdderDense, use_bias=False, dtype=dtype,
                             implementation=implementation)
  if conv == "mult":
    return functools.partial(nn.Dense, use_bias=False, dtype=dtype,
                             kernel_init=torch_default_init)
  raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")


# PyTorch's default conv/linear init (kaiming_uniform with a=sqrt(5)), which
# the official CNN baselines use: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")


def batch_norm(train: bool, *, dtype: Any, axis_name: str | None,
               name: str) -> nn.BatchNorm:
  """BatchNorm with the official constants: eps 1e-5, PyTorch momentum 0.1.

  The variance is computed in two passes, E[(x - E[x])^2], as PyTorch does:
  adder outputs have means in the hundreds, and the one-pass E[x^2] - E[x]^2
  loses most of its float32 precision there (measured: 10-100x larger
  differences between 8-device and 1-device training).
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, axis_name=axis_name,
                      use_fast_variance=False, name=name)


def pad_same_as_torch(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric `padding=kernel // 2` (not JAX's asymmetric SAME)."""
  p = kernel // 2
  return ((p, p), (p, p))
