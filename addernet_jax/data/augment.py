"""On-device augmentation and normalisation for in-memory datasets (jit-able)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from addernet_jax.data import info as info_lib

CROP_PADDING = 4


def normalize(images: jax.Array, info: info_lib.DatasetInfo) -> jax.Array:
  """(x / 255 - mean) / std in float32, per channel (torchvision's ToTensor
  then Normalize)."""
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def random_crop_flip(images: jax.Array, rng: jax.Array,
                     padding: int = CROP_PADDING) -> jax.Array:
  """Per image: zero-pad by `padding`, take a random window of the original
  size (offsets uniform in 0..2*padding) and flip horizontally with p=0.5.

  Works on any dtype; padding is the pixel value 0 (torchvision's
  RandomCrop(size, padding) followed by RandomHorizontalFlip).
  """
  n, h, w, _ = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_rng, 0.5, (n,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                            (0, 0)))

  def one(img, off, flip):
    win = jax.lax.dynamic_slice(img, (off[0], off[1], 0),
                                (h, w, img.shape[-1]))
    return jnp.where(flip, win[:, ::-1], win)

  return jax.vmap(one)(padded, offsets, flips)


def augment_and_normalize(images_uint8: jax.Array, rng: jax.Array,
                          info: info_lib.DatasetInfo, *, train: bool
                          ) -> jax.Array:
  """Training augmentation (if `train`) and normalisation, inside a jit step.

  Args:
    images_uint8: [B, H, W, C] uint8 with (H, W, C) == info.image_shape.
    rng: a PRNG key (typed or raw uint32); only used when `train`.
    info: the dataset's `DatasetInfo` (static).
    train: for 32x32 RGB datasets (CIFAR) apply random crop 32 with 4-pixel
      zero padding and a random horizontal flip, independently per image,
      before normalising (padded pixels become -mean/std, as in torchvision's
      RandomCrop(32, padding=4), ToTensor, Normalize). MNIST and digits are
      only normalised, as is everything when `train` is False.

  Returns:
    float32 [B, H, W, C] normalised images.
  """
  shape = tuple(images_uint8.shape)
  if len(shape) != 4 or shape[1:] != tuple(info.image_shape):
    raise ValueError(
        f'augment_and_normalize: images of shape {shape}, expected '
        f'[B, {", ".join(map(str, info.image_shape))}] for {info.name}.')
  if images_uint8.dtype != jnp.uint8:
    raise TypeError(f'augment_and_normalize: images must be uint8 (0..255), '
                    f'got {images_uint8.dtype}.')
  if train and info.cifar_augment:
    images_uint8 = random_crop_flip(images_uint8, rng)
  return normalize(images_uint8, info)
