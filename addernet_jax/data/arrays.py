"""`load_arrays`: a whole in-memory split from TFDS, a local directory or
scikit-learn."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from addernet_jax.data import info as info_lib
from addernet_jax.data import local
from addernet_jax.data import tfds_source

SPLITS = ('train', 'test')

# Optional cache of decoded ImageFolder splits (never written into data_dir).
CACHE_ENV = 'ADDERNET_JAX_CACHE_DIR'


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

  Decoding an ImageFolder of small JPEGs takes a while (the CIFAR-10 JPEG
  training set: about 20 s on a 2-core CPU). Setting the environment variable
  ADDERNET_JAX_CACHE_DIR to a directory caches decoded ImageFolder splits
  there as .npz, keyed by the path, size and modification time of every
  file; nothing is ever written into data_dir.

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
      images, labels = _load_imagefolder_cached(root, split, info)
    elif layout == 'cifar':
      images, labels = local.load_cifar(root, name, split)
    elif layout == 'mnist':
      images, labels = local.load_mnist(root, split)
    else:
      images, labels = tfds_source.load_tfds_arrays(name, str(root), split,
                                                    info)
  return local.check_arrays(images, labels, info, source)


def load_in_memory_splits(
    name: str, data_dir: str | os.PathLike[str] | None, *,
    holdout_examples: int = 0, eval_max_examples: int = -1,
    with_train: bool = True,
) -> tuple[tuple[np.ndarray, np.ndarray] | None,
           tuple[np.ndarray, np.ndarray]]:
  """The training and evaluation arrays of a run, as training and `eval.py`
  both use them.

  Args:
    name, data_dir: as for `load_arrays`.
    holdout_examples: > 0: evaluate on the LAST this many training examples
      and train on the rest (data without a test split); else the test split.
    eval_max_examples: > 0: keep at most this many evaluation examples.
    with_train: False returns None for the training pair (evaluation only;
      the training split is still read when examples are held back).

  Returns:
    ((train images, labels) or None, (eval images, labels)).
  """
  holdout = int(holdout_examples or 0)
  train = None
  if holdout > 0:
    images, labels = load_arrays(name, data_dir, 'train')
    if holdout >= len(labels):
      raise ValueError(f'config.holdout_examples={holdout} must be smaller '
                       f'than the {len(labels)} training examples')
    evaluation = images[-holdout:], labels[-holdout:]
    if with_train:
      train = images[:-holdout], labels[:-holdout]
  else:
    evaluation = load_arrays(name, data_dir, 'test')
    if with_train:
      train = load_arrays(name, data_dir, 'train')
  limit = int(eval_max_examples or -1)
  if limit > 0:
    evaluation = evaluation[0][:limit], evaluation[1][:limit]
  return train, evaluation


def _cache_key(root: Path, split: str, name: str) -> tuple[str, list[str]]:
  paths, _, _ = local.list_imagefolder(root, split)
  h = hashlib.sha256(f'{name}|{split}|{root.resolve()}'.encode())
  for p in paths:
    st = os.stat(p)
    h.update(f'|{p}|{st.st_size}|{st.st_mtime_ns}'.encode())
  return h.hexdigest()[:32], paths


def _load_imagefolder_cached(root: Path, split: str,
                             info: info_lib.DatasetInfo
                             ) -> tuple[np.ndarray, np.ndarray]:
  cache_dir = os.environ.get(CACHE_ENV)
  if not cache_dir:
    return local.load_imagefolder(root, split, info)
  key, _ = _cache_key(root, split, info.name)
  path = Path(cache_dir).expanduser() / f'{info.name}-{split}-{key}.npz'
  if path.is_file():
    with np.load(path) as f:
      return f['images'], f['labels']
  images, labels = local.load_imagefolder(root, split, info)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f'.tmp{os.getpid()}.npz')
  np.savez(tmp, images=images, labels=labels)
  os.replace(tmp, path)
  return images, labels
