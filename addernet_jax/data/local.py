"""Readers for datasets stored in local directories, detected by their layout.

Layouts: ImageFolder (JPEG/PNG class folders), CIFAR python pickles, MNIST IDX
(gzip or raw) and a prepared TensorFlow Datasets data_dir (read through
`tfds_source`). scikit-learn's bundled 8x8 digits need no directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import logging
import math
import multiprocessing
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from addernet_jax.data import info as info_lib

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.pgm', '.bmp', '.tif',
                  '.tiff', '.webp')

LAYOUTS_HELP = (
    'Accepted layouts for data_dir:\n'
    '  * ImageFolder: <data_dir>/train/<class>/*.jpg|*.png and <data_dir>/test/'
    ' (or val/) with the same class folders; class index = position in the '
    'sorted folder names of train/, one folder per class of the dataset '
    '(hidden folders ignored);\n'
    '  * CIFAR python pickles: data_batch_1..5 and test_batch (cifar10; the '
    'cifar-10-batches-py folder or its parent), train and test (cifar100; the '
    'cifar-100-python folder or its parent);\n'
    '  * MNIST IDX files, gzip or raw: train-images-idx3-ubyte[.gz], '
    'train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], '
    't10k-labels-idx1-ubyte[.gz] (an evaluation needs only the t10k pair);\n'
    '  * a TensorFlow Datasets data_dir holding the prepared dataset '
    '(<data_dir>/<name>/<version>/dataset_info.json).')

IMAGEFOLDER_SPLIT_DIRS = {'train': ('train',),
                          'test': ('test', 'val', 'validation')}
_CIFAR_SUBDIRS = {'cifar10': 'cifar-10-batches-py',
                  'cifar100': 'cifar-100-python'}
_MNIST_SUBDIRS = ('.', 'MNIST/raw', 'raw', 'mnist')
_MNIST_PREFIX = {'train': 'train', 'test': 't10k'}
_ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar', '.zip', '.tar.bz2', '.tar.xz',
                     '.7z')
# Neutral wording: train.py, eval.py and addernet_jax.figures (whose flag is
# --holdout_examples) all reach these errors.
_HOLDOUT_HINT = (
    ' To train without the test split, evaluate on held-back training images:'
    ' set holdout_examples=10000 (train.py, eval.py: '
    '--config.holdout_examples=10000; addernet_jax.figures: '
    '--holdout_examples 10000).')
_NO_TRAIN_HINT = (
    ' Training needs it; an evaluation reads it only to re-estimate the '
    'BatchNorm statistics, which recalibrate_bn_batches=0 skips (eval.py: '
    '--config.recalibrate_bn_batches=0).')
_REPLACE = 'replace it with an intact copy (e.g. download it again)'


class ImageDecodeError(ValueError):
  """An image file that cannot be decoded (empty, truncated, corrupt or not
  an image at all); the message names the file."""


def _is_archive(path: Path) -> bool:
  return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


# ------------------------------------------------------------------ layout --

def check_dir(data_dir: str | os.PathLike[str]) -> Path:
  """Returns `data_dir` as a Path; ValueError if missing, not a dir or empty."""
  root = Path(data_dir).expanduser()
  if not root.exists():
    raise ValueError(f'data_dir {str(root)!r} does not exist. {LAYOUTS_HELP}')
  if not root.is_dir():
    hint = (' It is an archive: extract it first (e.g. tar xzf FILE -C DIR or'
            ' unzip FILE -d DIR) and pass the extracted folder that holds '
            'train/ and test/ (or the dataset files).'
            if _is_archive(root) else '')
    raise ValueError(f'data_dir {str(root)!r} is not a directory.{hint} '
                     f'{LAYOUTS_HELP}')
  if not any(root.iterdir()):
    raise ValueError(f'data_dir {str(root)!r} is empty. {LAYOUTS_HELP}')
  return root


def _class_dirs(path: Path) -> list[Path]:
  """Sub-folders of `path` sorted by name, hidden ones ('.*', such as
  .ipynb_checkpoints) left out."""
  if not path.is_dir():
    return []
  return sorted((p for p in path.iterdir()
                 if not p.name.startswith('.') and p.is_dir()),
                key=lambda p: p.name)


def _image_files(folder: Path | str) -> list[str]:
  """Sorted paths, relative to `folder`, of the image files in it and its
  sub-folders, as torchvision's ImageFolder finds them (nested folders were
  skipped without a word: a class could train on none of its images).
  Hidden files and folders ('.*') are left out; an image name that is not a
  readable file (a dangling link) is a ValueError naming it. The order is
  torchvision's: folder by folder in sorted order of their paths, file names
  sorted within each."""
  found = []
  pending = ['']  # folders to list, relative to `folder`
  while pending:
    relative = pending.pop()
    # DirEntry.is_file/is_dir read the directory's own record: no stat per
    # file (ImageNet has 1.28M), except for links.
    with os.scandir(os.path.join(folder, relative)) as it:
      for entry in it:
        if entry.name.startswith('.'):
          continue
        path = os.path.join(relative, entry.name)
        if entry.is_dir():
          pending.append(path)
        elif entry.name.lower().endswith(IMG_EXTENSIONS):
          if not entry.is_file():
            raise ValueError(f'{os.path.join(folder, path)}: not a readable '
                             f'file (a broken link?); remove it or restore '
                             f'its target')
          found.append(path)
  return sorted(found, key=lambda p: (os.path.dirname(p), p))


def _has_image_file(folder: Path) -> bool:
  with os.scandir(folder) as it:
    return any(e.name.lower().endswith(IMG_EXTENSIONS) and
               not e.name.startswith('.') and e.is_file() for e in it)


def layout_hint(root: Path) -> str:
  """A hint for a directory of no known layout: a split folder passed
  instead of its parent, the data one folder down (an archive extracted into
  it), or archives still to extract ('' if none of these)."""
  hints = []
  if any(_has_image_file(d) for d in _class_dirs(root)):
    hints.append(
        f' It looks like a single ImageFolder split (its sub-folders are class'
        f' folders of images): pass its parent {str(root.parent)!r}, which '
        'should hold train/ and test/ (or val/).')
  # `tar xzf FILE -C DIR` puts the data one folder down: DIR/cifar10-jpeg.
  inner = [d for d in _class_dirs(root)[:32]
           if is_imagefolder(d) or is_mnist(d) or any(
               _cifar_dir(d, n) is not None for n in _CIFAR_SUBDIRS)]
  if inner:
    hints.append(f' Its sub-folder {inner[0].name!r} holds a known layout: '
                 f'pass {str(inner[0])!r} (--config.data_dir='
                 f'{inner[0]}).')
  archives = sorted(p.name for p in root.iterdir()
                    if _is_archive(p) and p.is_file())
  if archives:
    hints.append(f' It holds archives ({", ".join(archives[:5])}): extract '
                 'them first and pass the extracted folder.')
  return ''.join(hints)


def is_imagefolder(root: Path) -> bool:
  return any(_class_dirs(root / d)
             for dirs in IMAGEFOLDER_SPLIT_DIRS.values() for d in dirs)


def _cifar_dir(root: Path, name: str) -> Path | None:
  """The folder holding CIFAR pickles of `name` (itself or the official subdir)."""
  want = (('data_batch_1', 'test_batch') if name == 'cifar10'
          else ('train', 'test'))
  for cand in (root, root / _CIFAR_SUBDIRS[name]):
    if all((cand / f).is_file() for f in want):
      return cand
    # Only one split present (e.g. an evaluation copy).
    if name == 'cifar10' and cand.is_dir() and (
        (cand / 'test_batch').is_file() or
        any(cand.glob('data_batch_*'))):
      return cand
    if name == 'cifar100' and (cand / 'meta').is_file():
      return cand
  return None


def _mnist_files(root: Path, split: str) -> tuple[Path | None, Path | None]:
  """(images, labels) IDX files of a split under root, each None if absent."""
  prefix = _MNIST_PREFIX[split]
  found = []
  for kind, ndim in (('images', 3), ('labels', 1)):
    hit = None
    for sub in _MNIST_SUBDIRS:
      for sep in ('-', '.'):
        for ext in ('', '.gz'):
          cand = root / sub / f'{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}'
          if cand.is_file():
            hit = cand
            break
        if hit:
          break
      if hit:
        break
    found.append(hit)
  return found[0], found[1]


def is_mnist(root: Path) -> bool:
  return any(f is not None for split in _MNIST_PREFIX
             for f in _mnist_files(root, split))


def _other_dataset_hint(found: str, name: str) -> str:
  return (f'set the dataset to {found} (train.py, eval.py: '
          f'--config.dataset={found}) or point data_dir at the {name} files.')


def detect_layout(root: Path, name: str) -> str:
  """'imagefolder', 'cifar', 'mnist' or 'tfds'; ValueError if none matches."""
  from addernet_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  if is_imagefolder(root):
    return 'imagefolder'
  if name in _CIFAR_SUBDIRS and _cifar_dir(root, name) is not None:
    return 'cifar'
  if is_mnist(root):
    if name == 'mnist':
      return 'mnist'
    found = [f.name for split in _MNIST_PREFIX
             for f in _mnist_files(root, split) if f is not None]
    raise ValueError(
        f'data_dir {str(root)!r} holds MNIST IDX files ({", ".join(found)}),'
        f' not {name} data: {_other_dataset_hint("mnist", name)}')
  if tfds_source.prepared_dir(name, root) is not None:
    return 'tfds'
  other = [n for n in _CIFAR_SUBDIRS if n != name and
           _cifar_dir(root, n) is not None]
  if other:
    raise ValueError(
        f'data_dir {str(root)!r} holds {other[0]} pickles, not {name} data: '
        f'{_other_dataset_hint(other[0], name)}')
  hint = layout_hint(root)
  entries = sorted(p.name for p in root.iterdir())[:10]
  raise ValueError(
      f'Unrecognised layout in data_dir {str(root)!r} for dataset {name!r} '
      f'(entries: {entries}).{hint} {LAYOUTS_HELP}')


# ------------------------------------------------------------------ checks --

def check_arrays(images: np.ndarray, labels: np.ndarray,
                 info: info_lib.DatasetInfo, source: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Validates shapes and label range; returns (uint8 NHWC, int32 labels)."""
  if images.ndim == 3 and info.image_shape[2] == 1:
    images = images[..., None]
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(info.image_shape):
    raise ValueError(
        f'{source}: images have shape {tuple(images.shape)}, expected '
        f'[N, {", ".join(map(str, info.image_shape))}] for {info.name}.')
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(f'{source}: {images.shape[0]} images but labels of shape '
                     f'{labels.shape}.')
  if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
    raise ValueError(
        f'{source}: labels range from {labels.min()} to {labels.max()}, '
        f'outside 0..{info.num_classes - 1} for {info.name}.')
  if images.shape[0] == 0:
    raise ValueError(f'{source}: no images found.')
  return (np.ascontiguousarray(images, dtype=np.uint8),
          labels.astype(np.int32))


# ------------------------------------------------------------------ CIFAR --

def _cifar_error(path: Path, problem: str) -> ValueError:
  return ValueError(f'cannot read CIFAR file {str(path)!r}: {problem}; '
                    f'{_REPLACE}.')


# The only globals a CIFAR batch pickle names (NumPy arrays, from NumPy 1 or
# 2, pickle protocols 2-5); anything else would run code on loading.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')})


class _RefusedGlobal(pickle.UnpicklingError):
  pass


class _CifarUnpickler(pickle.Unpickler):
  """Loads NumPy arrays and builtins only: a data_dir from elsewhere cannot
  run code through a crafted pickle."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _CIFAR_PICKLE_GLOBALS:
      raise _RefusedGlobal(f'it names {module}.{name}, which a CIFAR batch '
                           'never holds (refused: loading it could run code)')
    return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, object]:
  """The dict of a CIFAR python pickle; ValueError naming a damaged file or
  one that names anything but NumPy arrays."""
  with open(path, 'rb') as f:
    try:
      # encoding='bytes': the official pickles were written by Python 2.
      d = _CifarUnpickler(f, encoding='bytes').load()
    except _RefusedGlobal as e:
      raise ValueError(f'cannot read CIFAR file {str(path)!r}: {e}; use the '
                       'official python-version archive.') from e
    except Exception as e:  # pylint: disable=broad-except
      # Damaged bytes make the unpickler raise almost any type (EOFError,
      # UnpicklingError, KeyError, ValueError, ...).
      raise _cifar_error(path, 'truncated or corrupt pickle '
                         f'({type(e).__name__}: {e})') from e
  if not isinstance(d, dict):
    raise _cifar_error(path, f'the pickle holds a {type(d).__name__}, not the'
                       ' dict of a CIFAR batch')
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar(root: Path, name: str, split: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10/100 python pickles -> (uint8 [N, 32, 32, 3], labels)."""
  folder = _cifar_dir(root, name)
  assert folder is not None
  if name == 'cifar10':
    files = (sorted(folder.glob('data_batch_*')) if split == 'train'
             else [folder / 'test_batch'])
    key = 'labels'
  else:
    files = [folder / ('train' if split == 'train' else 'test')]
    key = 'fine_labels'
  files = [f for f in files if f.is_file()]
  if not files:
    hint = _NO_TRAIN_HINT if split == 'train' else _HOLDOUT_HINT
    raise ValueError(f'CIFAR pickles in {str(folder)!r} have no {split} split '
                     f'({"data_batch_*" if split == "train" else "test_batch"}'
                     f' expected).{hint}' if name == 'cifar10' else
                     f'CIFAR-100 pickles in {str(folder)!r} have no '
                     f'{split!r} file.{hint}')
  images, labels = [], []
  for f in files:
    d = _unpickle(f)
    if 'data' not in d or key not in d:
      raise _cifar_error(f, f'not a {name} batch (keys {sorted(map(str, d))};'
                         f" 'data' and {key!r} expected)")
    try:
      data = np.asarray(d['data'], dtype=np.uint8)
      batch_labels = np.asarray(d[key], dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as e:
      raise _cifar_error(f, f"'data' or {key!r} is not an integer array "
                         f'({type(e).__name__}: {e})') from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
      raise _cifar_error(f, f'data has shape {data.shape}, expected [N, 3072]'
                         ' (CIFAR rows: 1024 R, 1024 G, 1024 B)')
    if batch_labels.shape != (data.shape[0],):
      raise _cifar_error(f, f'{data.shape[0]} images but {key!r} of shape '
                         f'{batch_labels.shape}')
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(batch_labels)
  return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------ MNIST --

def _mnist_error(path: Path, problem: str) -> ValueError:
  return ValueError(f'cannot read MNIST file {str(path)!r}: {problem}; '
                    f'{_REPLACE}.')


def _read_idx(path: Path, ndim: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (gzip or raw); ValueError naming a
  damaged file."""
  gz = path.suffix == '.gz'
  try:
    with (gzip.open if gz else open)(path, 'rb') as f:
      raw = f.read()
  except EOFError as e:
    raise _mnist_error(path, f'truncated gzip stream ({e})') from e
  except gzip.BadGzipFile as e:
    problem = ('not a gzip file despite its .gz name'
               if str(e).startswith('Not a gzipped file') else
               'corrupt gzip stream')
    raise _mnist_error(path, f'{problem} ({e})') from e
  except zlib.error as e:
    raise _mnist_error(path, f'corrupt gzip stream ({e})') from e
  if len(raw) < 4 + 4 * ndim:
    unzipped = ' once unzipped' if gz else ''
    raise _mnist_error(path, f'{len(raw)} bytes{unzipped}, too short for an '
                       'IDX header')
  zero, dtype_code, file_ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
  if zero != 0 or dtype_code != 0x08 or file_ndim != ndim:
    gzip_hint = ('; it holds gzip data: add .gz to its name'
                 if not gz and raw[:2] == b'\x1f\x8b' else '')
    raise _mnist_error(
        path, f'not an unsigned-byte IDX file with {ndim} dimensions '
        f'(magic {raw[:4].hex()}, expected 0000080{ndim}){gzip_hint}')
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big')
               for i in range(ndim))
  header = 4 + 4 * ndim
  size = math.prod(dims)
  if len(raw) - header != size:
    raise _mnist_error(path, f'header says shape {dims} ({size} bytes) but '
                       f'the file has {len(raw) - header} bytes of data')
  # A copy: a view of `raw` would be read-only, unlike every other loader's.
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """MNIST IDX files -> (uint8 [N, 28, 28], labels)."""
  images_path, labels_path = _mnist_files(root, split)
  if images_path is None or labels_path is None:
    prefix = _MNIST_PREFIX[split]
    raise ValueError(
        f'MNIST IDX files in {str(root)!r} lack the {split} pair: need '
        f'{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]'
        f' (found images: {images_path}, labels: {labels_path}).'
        + (_HOLDOUT_HINT if split == 'test' else _NO_TRAIN_HINT))
  images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
  if len(images) != len(labels):
    raise ValueError(
        f'MNIST files {str(images_path)!r} ({len(images)} images) and '
        f'{str(labels_path)!r} ({len(labels)} labels) do not match: '
        'replace the wrong one with an intact copy (e.g. download both '
        'again).')
  return images, labels


# ------------------------------------------------------------ ImageFolder --

def imagefolder_split_dir(root: Path, split: str) -> Path:
  for d in IMAGEFOLDER_SPLIT_DIRS[split]:
    if _class_dirs(root / d):
      return root / d
  raise ValueError(
      f'ImageFolder data_dir {str(root)!r} has no {split} split: expected '
      f'class folders under one of '
      f'{", ".join(d + "/" for d in IMAGEFOLDER_SPLIT_DIRS[split])}.'
      + (_NO_TRAIN_HINT if split == 'train' else _HOLDOUT_HINT))


def list_imagefolder(root: Path, split: str,
                     info: info_lib.DatasetInfo | None = None
                     ) -> tuple[list[str], np.ndarray, list[str]]:
  """(file paths, int32 labels, class names) of an ImageFolder split.

  The class names are the sorted folder names of train/ when it exists (so
  that a val/ lacking a class keeps the training indices), else of the split;
  hidden folders and files ('.*') are ignored. Given `info`, those folders
  must number exactly `info.num_classes` (ValueError otherwise: a missing
  folder would shift the index of every later class).

  The files are interleaved by class, not grouped: file k of a class comes
  at fraction (k + 1/2) / n of the list, with n the files of its class (file
  names sorted within each class, ties in class order). With equal class
  sizes that is file 0 of every class, then file 1 of every class, and so on,
  so any prefix or suffix of the list (`eval_max_examples`,
  `holdout_examples`) keeps the class proportions.
  """
  split_dir = imagefolder_split_dir(root, split)
  class_root = root / 'train' if _class_dirs(root / 'train') else split_dir
  classes = [p.name for p in _class_dirs(class_root)]
  if info is not None and len(classes) != info.num_classes:
    shown = ', '.join(classes[:12]) + (', ...' if len(classes) > 12 else '')
    raise ValueError(
        f'ImageFolder {str(root)!r} has {len(classes)} class folders in '
        f'{str(class_root)!r}, '
        f'{"more" if len(classes) > info.num_classes else "fewer"} than the '
        f'{info.num_classes} classes of {info.name} (found: {shown}). The '
        'class index is the position in the sorted folder names, so every '
        'class needs its folder there.')
  index = {c: i for i, c in enumerate(classes)}
  per_class: list[tuple[int, list[str]]] = []
  empty: list[str] = []
  for class_dir in _class_dirs(split_dir):
    if class_dir.name not in index:
      raise ValueError(
          f'{class_dir}: class folder {class_dir.name!r} is not among the '
          f'{len(classes)} classes of {class_root}.')
    files = _image_files(class_dir)
    if files:
      per_class.append((index[class_dir.name],
                        [os.path.join(class_dir, f) for f in files]))
    else:
      empty.append(class_dir.name)
  if empty and per_class:
    shown = ', '.join(repr(c) for c in empty[:8]) + (
        f' and {len(empty) - 8} more' if len(empty) > 8 else '')
    logger.warning(
        'ImageFolder split %r: %d class folder(s) have no image files (%s), '
        'so those classes %s', str(split_dir), len(empty), shown,
        'train on no image' if split == 'train' else 'have no example here')
  if not per_class:
    raise ValueError(f'ImageFolder split {str(split_dir)!r} has no image files'
                     f' ({", ".join(IMG_EXTENSIONS)}).')
  all_paths = [p for _, files in per_class for p in files]
  labels = np.concatenate([np.full(len(files), c, np.int32)
                           for c, files in per_class])
  # (2k + 1) / (2n): exact ties for equal fractions (correctly rounded).
  position = np.concatenate([(2 * np.arange(len(files)) + 1) / (2 * len(files))
                             for _, files in per_class])
  order = np.lexsort((labels, position))
  return [all_paths[i] for i in order], labels[order], classes


_GREY_MODES = ('L', '1')
_COLOUR_MODES = ('RGB', 'P', 'CMYK', 'YCbCr')


# What PIL raises for an unreadable file: UnidentifiedImageError (an
# OSError) for an empty or non-image file, OSError 'image file is truncated'
# or 'Truncated File Read', SyntaxError, EOFError, struct.error or ValueError
# from some corrupt headers.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError,
                  struct.error)


@contextlib.contextmanager
def image_file_errors(path: str) -> Iterator[None]:
  """Turns an error reading or decoding image file `path` (inside the
  `with`) into an `ImageDecodeError` naming the file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    yield
  except ImageDecodeError:
    raise
  except (*_DECODE_ERRORS, Image.DecompressionBombError) as e:
    raise ImageDecodeError(
        f'{path}: cannot decode this image file ({type(e).__name__}: {e}); '
        'it is empty, truncated, corrupt or not an image: remove it or '
        'replace it with a valid copy.') from e


def to_8_bit(img, path: str):
  """`img` (a PIL image) with 8 bits per channel: 16-bit grey (PNG mode
  'I;16*') scaled to 0..255 (PIL's own conversion clips it to white); 32-bit
  integer or float images, whose range is unknown, are refused naming the
  file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if img.mode.startswith('I;16'):
    wide = np.asarray(img).astype(np.uint32)
    return Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode='L')
  if img.mode in ('I', 'F'):
    raise ImageDecodeError(
        f'{path}: a {"32-bit integer" if img.mode == "I" else "float"} image '
        f'(PIL mode {img.mode!r}) has no known 0..255 range: convert it to '
        '8 or 16 bits per channel.')
  return img


def decode_image(path: str, shape: Sequence[int]) -> np.ndarray:
  """Decodes one image file to uint8 HWC of exactly `shape` (no resizing).

  Palette, CMYK and YCbCr images are converted to RGB, bilevel to grey; images
  of another size or channel count raise ValueError naming the shape, files
  that cannot be decoded `ImageDecodeError` (a ValueError) naming the file.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = shape
  arr = None
  with image_file_errors(path):
    with Image.open(path) as img:
      img = to_8_bit(img, path)
      mode = img.mode
      channels = (1 if mode in _GREY_MODES else 3 if mode in _COLOUR_MODES
                  else len(img.getbands()))
      got = (img.height, img.width, channels)
      if got == (h, w, c):
        if c == 3 and mode != 'RGB':
          img = img.convert('RGB')
        elif c == 1 and mode != 'L':
          img = img.convert('L')
        arr = np.asarray(img, dtype=np.uint8)
  if arr is None:
    raise ValueError(f'{path}: image of shape {got} (H, W, C; mode {mode}),'
                     f' expected {(h, w, c)}.')
  return arr.reshape(h, w, c)


def _decode_chunk(paths: Sequence[str], shape: Sequence[int]) -> np.ndarray:
  out = np.empty((len(paths), *shape), np.uint8)
  for i, p in enumerate(paths):
    out[i] = decode_image(p, shape)
  return out


def _default_decode_workers() -> int:
  """Worker processes for decoding: none below 4 CPUs (spawning them costs
  more than it saves there), else one per CPU up to 16."""
  cpus = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
          else os.cpu_count() or 1)
  return 0 if cpus < 4 else min(16, cpus)


# Fewer files decode too fast for a progress bar to help.
_BAR_MIN_FILES = 2000


def decode_images(paths: Sequence[str], shape: Sequence[int], *,
                  desc: str = 'decoding', num_workers: int | None = None,
                  chunk: int = 500, progress_bar: bool = True) -> np.ndarray:
  """Decodes image files to uint8 [N, *shape] with a tqdm progress bar
  (from `_BAR_MIN_FILES` files, unless `progress_bar` is False).

  Decoding a small JPEG with PIL is mostly Python work (header parsing), so
  large lists are decoded in a pool of worker processes (spawned: safe after
  JAX has started threads; as with any spawned worker, the calling script
  needs an `if __name__ == '__main__':` guard). Lists under 4 chunks,
  machines with fewer than 4 CPUs and `num_workers=0` decode in this
  process.
  """
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  shape = tuple(int(d) for d in shape)
  out = np.empty((len(paths), *shape), np.uint8)
  starts = range(0, len(paths), chunk)
  if num_workers is None:
    num_workers = _default_decode_workers()
  with tqdm.tqdm(total=len(paths), desc=desc, unit='img',
                 disable=not progress_bar or len(paths) < _BAR_MIN_FILES,
                 leave=False) as bar:
    if num_workers <= 1 or len(starts) < 4:
      for s in starts:
        out[s:s + chunk] = _decode_chunk(paths[s:s + chunk], shape)
        bar.update(min(chunk, len(paths) - s))
      return out
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(num_workers,
                                                mp_context=ctx) as pool:
      futures = {pool.submit(_decode_chunk, paths[s:s + chunk], shape): s
                 for s in starts}
      try:
        for fut in concurrent.futures.as_completed(futures):
          block = fut.result()
          s = futures[fut]
          out[s:s + len(block)] = block
          bar.update(len(block))
      except BaseException:
        for fut in futures:
          fut.cancel()
        raise
  return out


def load_imagefolder(root: Path, split: str, info: info_lib.DatasetInfo, *,
                     progress_bar: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Whole ImageFolder split decoded to uint8 [N, H, W, C] (no resizing);
  `progress_bar` False hides the decoding bar."""
  paths, labels, _ = list_imagefolder(root, split, info)
  images = decode_images(paths, info.image_shape,
                         desc=imagefolder_desc(root, split, info),
                         progress_bar=progress_bar)
  return images, labels


def imagefolder_desc(root: Path, split: str,
                     info: info_lib.DatasetInfo) -> str:
  """The label of the decoding progress bar of an ImageFolder split."""
  return f'{info.name} {split} ({root.name})'


# ----------------------------------------------------------------- digits --

DIGITS_TEST_FRACTION = 0.2


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 digits, uint8 [N, 8, 8, 1] (0..16 -> 0..255).

  Deterministic stratified split: within each class, a fixed permutation
  (numpy PCG64, seed 0) and the last round(20%) of it go to the test split
  (1438 train / 359 test images).
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  target = np.asarray(digits.target, np.int64)
  rng = np.random.default_rng(0)
  is_test = np.zeros(len(target), bool)
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(target == c))
    n_test = int(round(DIGITS_TEST_FRACTION * len(idx)))
    is_test[idx[len(idx) - n_test:]] = True
  keep = is_test if split == 'test' else ~is_test
  return images[keep][..., None], target[keep]
