"""`load_arrays`: a whole in-memory split from TFDS, a local directory or
scikit-learn."""

from __future__ import annotations

import os

import numpy as np

from addernet_jax.data import info as info_lib
from addernet_jax.data import local
from addernet_jax.data import tfds_source

SPLITS = ('train', 'test')


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; accepted: {", ".join(SPLITS)}'
                     ' (test means the validation set for imagenet2012).')


def load_arrays(name: str, data_dir: str | os.PathLike[str] | None,
                split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split of an in-memory dataset.

  Args:
    name: 'cifar10', 'cifar100', 'mnist' or 'digits' (see `dataset_info`).
    data_dir: None for TensorFlow Datasets (downloads where the network
      allows; offline it fails within seconds, saying how to use local files)
      or a local directory whose layout is detected: ImageFolder, CIFAR python
      pickles, MNIST IDX (gzip or raw), or a prepared TFDS data_dir. Ignored
      for 'digits' (scikit-learn's bundled copy).
    split: 'train' or 'test'.

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]) with (H, W, C) the
    dataset's `image_shape`.

  Raises:
    ValueError: unknown name or split, a missing, empty or unrecognised
      directory, images of the wrong shape, labels out of range.
    RuntimeError: TFDS requested but not installed, or offline.
  """
  info = info_lib.dataset_info(name)
  check_split(split)
  if not info.in_memory:
    raise ValueError(f'{name} does not fit in memory: read it with '
                     'addernet_jax.data.streaming_iterator.')
  if name == 'digits':
    images, labels = local.load_digits(split)
    source = 'sklearn digits'
  elif data_dir is None or str(data_dir) == '':
    images, labels = tfds_source.load_tfds_arrays(name, None, split, info)
    source = f'TFDS {name}'
  else:
    root = local.check_dir(data_dir)
    layout = local.detect_layout(root, name)
    source = f'{name} {split} ({layout} layout in {str(root)!r})'
    if layout == 'imagefolder':
      images, labels = local.load_imagefolder(root, split, info)
    elif layout == 'cifar':
      images, labels = local.load_cifar(root, name, split)
    elif layout == 'mnist':
      images, labels = local.load_mnist(root, split)
    else:
      images, labels = tfds_source.load_tfds_arrays(name, str(root), split,
                                                    info)
  return local.check_arrays(images, labels, info, source)
