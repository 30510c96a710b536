"""`load_arrays`: a whole in-memory split from TFDS, a local directory or
scikit-learn."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from addernet_jax.data import info as info_lib
from addernet_jax.data import local
from addernet_jax.data import tfds_source

SPLITS = ('train', 'test')

# Optional cache of decoded ImageFolder splits (never written into data_dir).
CACHE_ENV = 'ADDERNET_JAX_CACHE_DIR'

logger = logging.getLogger(__name__)


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; accepted: {", ".join(SPLITS)}'
                     ' (test means the validation set for imagenet2012).')


def load_arrays(name: str, data_dir: str | os.PathLike[str] | None,
                split: str, *, progress_bar: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split of an in-memory dataset.

  Args:
    name: 'cifar10', 'cifar100', 'mnist' or 'digits' (see `dataset_info`).
    data_dir: None for TensorFlow Datasets (downloads where the network
      allows; offline it fails within seconds, saying how to use local files)
      or a local directory whose layout is detected: ImageFolder, CIFAR python
      pickles, MNIST IDX (gzip or raw), or a prepared TFDS data_dir. Ignored
      for 'digits' (scikit-learn's bundled copy).
    split: 'train' or 'test'.
    progress_bar: False hides the progress bar of ImageFolder decoding.

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]) with (H, W, C) the
    dataset's `image_shape`.

  Decoding an ImageFolder of small JPEGs takes a while (the CIFAR-10 JPEG
  training set: about 20 s on a 2-core CPU). Setting the environment variable
  ADDERNET_JAX_CACHE_DIR to a directory caches decoded ImageFolder splits
  there as .npz, keyed by the path, size and modification time of every
  file; nothing is ever written into data_dir. A damaged or stale cache
  entry is logged as a warning and rewritten; a cache that cannot be
  written is logged and skipped.

  Raises:
    ValueError: unknown name or split, a missing, empty or unrecognised
      directory, a damaged data file (named), images of the wrong shape,
      labels out of range, ADDERNET_JAX_CACHE_DIR naming a file or a
      directory that cannot be created.
    RuntimeError: TFDS requested but not installed, or offline.
  """
  info = info_lib.dataset_info(name)
  check_split(split)
  if not info.in_memory:
    raise ValueError(f'{name} does not fit in memory: read it with '
                     'addernet_jax.data.streaming_iterator.')
  if name == 'digits':
    if data_dir is not None and str(data_dir) != '':
      logger.warning('dataset digits is bundled with scikit-learn: data_dir '
                     '%r is not read (set the dataset to read a folder)',
                     str(data_dir))
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
      images, labels = _load_imagefolder_cached(root, split, info,
                                                progress_bar)
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
    with_train: bool = True, progress_bar: bool = True,
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
    progress_bar: False hides the progress bars of ImageFolder decoding
      (pass `progress.shown(config)`).

  Returns:
    ((train images, labels) or None, (eval images, labels)).
  """
  holdout = int(holdout_examples or 0)
  train = None
  if holdout > 0:
    images, labels = load_arrays(name, data_dir, 'train',
                                 progress_bar=progress_bar)
    if holdout >= len(labels):
      raise ValueError(f'holdout_examples={holdout} must be smaller '
                       f'than the {len(labels)} training examples')
    evaluation = images[-holdout:], labels[-holdout:]
    if with_train:
      train = images[:-holdout], labels[:-holdout]
  else:
    evaluation = load_arrays(name, data_dir, 'test',
                             progress_bar=progress_bar)
    if with_train:
      train = load_arrays(name, data_dir, 'train', progress_bar=progress_bar)
  limit = int(eval_max_examples or -1)
  if limit > 0:
    evaluation = evaluation[0][:limit], evaluation[1][:limit]
  return train, evaluation


def _cache_key(paths: list[str], root: Path, split: str, name: str) -> str:
  h = hashlib.sha256(f'{name}|{split}|{root.resolve()}'.encode())
  for p in paths:
    st = os.stat(p)
    h.update(f'|{p}|{st.st_size}|{st.st_mtime_ns}'.encode())
  return h.hexdigest()[:32]


def _cache_dir() -> Path | None:
  """The directory named by ADDERNET_JAX_CACHE_DIR (created if missing), or
  None when the variable is unset or empty.

  Raises:
    ValueError: it names a file, or a directory that cannot be created.
  """
  value = os.environ.get(CACHE_ENV)
  if not value:
    return None
  path = Path(value).expanduser()
  if path.exists() and not path.is_dir():
    raise ValueError(f'{CACHE_ENV}={value!r} is a file, not a directory: '
                     'point it at a directory (created if missing) or unset '
                     'it.')
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f'{CACHE_ENV}={value!r}: cannot create this directory '
                     f'({e}); point it at a writable directory or unset it.'
                     ) from e
  return path


def _read_cache(path: Path, labels: np.ndarray, shape: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray] | None:
  """The cached (images, labels) at `path`; None (with a warning for a
  damaged or mismatched entry) when there is none to use."""
  if not path.exists():
    return None
  try:
    with open(path, 'rb') as f:
      is_zip = f.read(4) == b'PK\x03\x04'
    if not is_zip:
      raise ValueError('not a zip (.npz) file')
    with np.load(path, allow_pickle=False) as f:
      images, cached = f['images'], f['labels']
  except Exception as e:  # pylint: disable=broad-except
    # A damaged zip raises almost any type (BadZipFile, zlib.error, EOFError,
    # KeyError, ValueError, OSError, ...); the cache must never be fatal.
    problem = f'{type(e).__name__}: {e}'
  else:
    if (images.dtype == np.uint8 and images.shape == (len(labels), *shape)
        and np.array_equal(cached, labels)):
      return images, cached
    problem = (f'images {images.dtype} {images.shape} and labels '
               f'{cached.shape}, expected uint8 {(len(labels), *shape)} and '
               'the listed labels')
  logger.warning('damaged %s cache entry %s (%s); decoding the images again '
                 'and rewriting it.', CACHE_ENV, path, problem)
  return None


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes the entry atomically (a temporary file renamed over `path`); a
  failure is logged, not raised."""
  tmp = path.with_suffix(f'.tmp{os.getpid()}.npz')
  try:
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, path)
  except OSError as e:
    logger.warning('%s: cannot write the cache entry %s (%s); continuing '
                   'without it.', CACHE_ENV, path, e)
    with contextlib.suppress(OSError):
      tmp.unlink()


def _load_imagefolder_cached(root: Path, split: str,
                             info: info_lib.DatasetInfo,
                             progress_bar: bool = True
                             ) -> tuple[np.ndarray, np.ndarray]:
  folder = _cache_dir()
  if folder is None:
    return local.load_imagefolder(root, split, info,
                                  progress_bar=progress_bar)
  paths, labels, _ = local.list_imagefolder(root, split, info)
  key = _cache_key(paths, root, split, info.name)
  path = folder / f'{info.name}-{split}-{key}.npz'
  cached = _read_cache(path, labels, tuple(info.image_shape))
  if cached is not None:
    return cached
  images = local.decode_images(paths, info.image_shape,
                               desc=local.imagefolder_desc(root, split, info),
                               progress_bar=progress_bar)
  _write_cache(path, images, labels)
  return images, labels
