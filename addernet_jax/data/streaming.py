"""Streaming input pipeline (Grain) for datasets that do not fit in memory.

Reads an ImageFolder (ImageNet as prepared for pytorch/examples: train/ and
val/ class folders of JPEGs) and decodes and augments in Grain worker
processes, off the training thread. Each process reads only its own part of
every global batch: with G the global batch and P processes, process i gets
positions [i*G/P, (i+1)*G/P) of each global batch, so concatenating the
per-process batches in process order gives exactly the global batch of a
single-process run (for any worker count). The order and the augmentation
depend only on `seed` and the position in the stream, so the pipeline is
deterministic and resumes from `start_step` without replaying earlier steps.

Training epochs are reshuffled (a permutation per epoch) and drop their last
incomplete global batch. Evaluation reads every example once in listing order
(`local.list_imagefolder`: interleaved by class); its last global batch is
padded with blank examples whose 'mask' is False.

All transforms are module-level classes so they pickle into Grain's spawned
worker processes.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from addernet_jax.data import arrays
from addernet_jax.data import info as info_lib
from addernet_jax.data import local

# torchvision's RandomResizedCrop defaults.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_RESIZE = 256  # ImageNet evaluation: resize 256, center crop 224.


class ImageFolderSource:
  """Random-access (path, label) records of an ImageFolder split.

  Paths are stored as one bytes blob with offsets, so that pickling the
  source into worker processes stays cheap for millions of files. The
  records are in `local.list_imagefolder`'s order (interleaved by class);
  given `info`, the class folders must number `info.num_classes`.
  """

  def __init__(self, root: Path, split: str,
               info: info_lib.DatasetInfo | None = None):
    paths, labels, classes = local.list_imagefolder(root, split, info)
    self.root = str(root)
    self.classes = classes
    encoded = [os.path.relpath(p, root).encode('utf-8') for p in paths]
    self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    self._blob = b''.join(encoded)
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, index: int) -> str:
    lo, hi = self._offsets[index], self._offsets[index + 1]
    return os.path.join(self.root, self._blob[lo:hi].decode('utf-8'))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator
                            ) -> tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision's RandomResizedCrop.get_params."""
  area = height * width
  log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*RRC_SCALE)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < RRC_RATIO[0]:
    w, h = width, int(round(width / RRC_RATIO[0]))
  elif in_ratio > RRC_RATIO[1]:
    h, w = height, int(round(height * RRC_RATIO[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _decode_large(path: str, size: int, train: bool,
                  rng: np.random.Generator | None) -> np.ndarray:
  """ImageNet-style decode: RandomResizedCrop+flip (train) or resize 256 and
  center crop (eval), bilinear with antialiasing (PIL), uint8 RGB.

  Evaluation follows torchvision's PIL pipeline exactly; training lets JPEG
  decoding downscale by a power of two first where the crop allows (a
  slightly different filter, many times faster on full-size photos). A file
  that cannot be decoded raises `local.ImageDecodeError` naming it.
  """
  with local.image_file_errors(path):
    return _decode_large_unchecked(path, size, train, rng)


def _decode_large_unchecked(path: str, size: int, train: bool,
                            rng: np.random.Generator | None) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as img:
    width, height = img.size
    if img.format != 'JPEG':
      img = local.to_8_bit(img, path)
    if train:
      top, left, h, w = random_resized_crop_box(height, width, rng)
      # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop stays at
      # least `size` pixels tall and wide (much faster for large photos).
      if img.format == 'JPEG':
        img.draft('RGB', (max(1, width * size // w), max(1, height * size // h)))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
      else:
        box = (left, top, left + w, top + h)
      img = img.convert('RGB').resize((size, size), Image.BILINEAR, box=box)
      arr = np.asarray(img, np.uint8)
      if rng.random() < 0.5:
        arr = arr[:, ::-1]
      return arr
    img = img.convert('RGB')
    resize = EVAL_RESIZE * size // 224
    if width <= height:
      ow, oh = resize, int(resize * height / width)
    else:
      oh, ow = resize, int(resize * width / height)
    img = img.resize((ow, oh), Image.BILINEAR)
    top = int(round((oh - size) / 2.0))
    left = int(round((ow - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)),
                      np.uint8)


def _pad_crop_flip(arr: np.ndarray, rng: np.random.Generator,
                   padding: int = 4) -> np.ndarray:
  """CIFAR augmentation in numpy (the on-device one is augment.py)."""
  h, w, _ = arr.shape
  padded = np.pad(arr, ((padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  out = padded[top:top + h, left:left + w]
  return out[:, ::-1] if rng.random() < 0.5 else out


class LoadExample:
  """Maps a process-local stream index to one decoded, augmented example."""

  def __init__(self, source: ImageFolderSource, info: info_lib.DatasetInfo, *,
               train: bool, seed: int, global_batch_size: int,
               process_index: int, process_count: int, steps_per_epoch: int):
    self.source = source
    self.info = info
    self.train = train
    self.seed = int(seed)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = steps_per_epoch
    self._mean = np.asarray(info.mean, np.float32)
    self._std = np.asarray(info.std, np.float32)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_perms'] = {}
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, epoch]).permutation(
            len(self.source))
        self._perms = {epoch: perm, **{
            e: p for e, p in self._perms.items() if e > epoch - 2}}
      return perm

  def global_position(self, local_index: int) -> tuple[int, int]:
    """(epoch, position within the epoch's order) of a local stream index."""
    step, j = divmod(local_index, self.local_batch_size)
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    pos = (step_in_epoch * self.global_batch_size +
           self.process_index * self.local_batch_size + j)
    return epoch, pos

  def __call__(self, local_index: int) -> dict[str, Any]:
    epoch, pos = self.global_position(int(local_index))
    h, w, c = self.info.image_shape
    if not self.train and pos >= len(self.source):  # eval padding
      return {'image': np.zeros((h, w, c), np.float32),
              'label': np.int32(0), 'mask': np.bool_(False)}
    record = int(self._permutation(epoch)[pos]) if self.train else pos
    path = self.source.path(record)
    rng = (np.random.default_rng([self.seed, 1, epoch, pos]) if self.train
           else None)
    if h >= 64:
      arr = _decode_large(path, h, self.train, rng)
    else:
      arr = local.decode_image(path, self.info.image_shape)
      if self.train and self.info.cifar_augment:
        arr = _pad_crop_flip(arr, rng)
    image = (arr.astype(np.float32) / 255.0 - self._mean) / self._std
    example = {'image': image.astype(np.float32),
               'label': np.int32(self.source.labels[record])}
    if not self.train:
      example['mask'] = np.bool_(True)
    return example


class DataWorkerError(RuntimeError):
  """A worker process of the input pipeline died."""


class StreamingIterator(Iterator[dict]):
  """Iterator over per-process batches; also says how long an epoch is.

  Attributes:
    num_examples: examples in the split.
    steps_per_epoch: global batches per epoch (train: the last incomplete one
      dropped; eval: the last one padded).
    num_steps: batches this iterator yields in all from step 0 (None if
      infinite); it starts at `start_step`.
    classes: the class folder names (label i = classes[i]).
  """

  def __init__(self, grain_iter, *, num_examples: int, steps_per_epoch: int,
               num_steps: int | None, classes: list[str]):
    self._it = grain_iter
    self.num_examples = num_examples
    self.steps_per_epoch = steps_per_epoch
    self.num_steps = num_steps
    self.classes = classes

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self._it)
    except RuntimeError as e:
      # Grain's message when a worker process died (the OOM killer, kill -9):
      # "Worker process was ..." (Grain 0.2.16 on), "Grain worker process 0
      # was ..." (older ones, whose pool could also hang for good when the
      # worker died holding a lock it shares with the main process).
      died = re.search(r'[Ww]orker process (?:\d+ )?was terminated '
                       r'unexpectedly with exit code (-?\d+)', str(e))
      if died is None:
        raise
      code = int(died.group(1))
      how = f'exit code {code}'
      if code < 0:
        how = f'killed by signal {-code}' + (
            ', often the out-of-memory killer' if code == -9 else '')
      raise DataWorkerError(
          f'a data-loading worker process died ({how}): lower '
          f'--config.num_workers or give the machine more memory; rerunning '
          f'the command resumes from the last checkpoint') from None

  def __iter__(self):
    return self

  def close(self) -> None:
    """Stops the worker processes."""
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()


def _ensure_absl_flags_parsed() -> None:
  """Grain reads its absl flags when it starts worker processes; outside an
  absl app (scripts, notebooks, pytest) they are unparsed and reading them
  raises. Marking them parsed keeps every flag at its default."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def default_worker_count() -> int:
  return max(1, min(16, (os.cpu_count() or 2) - 1))


def streaming_iterator(name: str, data_dir: str | os.PathLike[str] | None,
                       split: str, *, global_batch_size: int,
                       process_index: int = 0, process_count: int = 1,
                       seed: int = 0, train: bool,
                       num_epochs: int | None = None, start_step: int = 0,
                       worker_count: int | None = None) -> StreamingIterator:
  """Per-process batches of an ImageFolder split, decoded in Grain workers.

  Args:
    name: dataset name (`dataset_info`); ImageNet gets RandomResizedCrop(224)
      and flip for training, resize 256 + center crop 224 for evaluation;
      32x32 RGB datasets pad-4 crop and flip; others are only normalised.
    data_dir: an ImageFolder directory (train/ and val/ or test/).
    split: 'train' or 'test' (test reads test/ or val/).
    global_batch_size: examples per step over all processes; must divide by
      `process_count`.
    process_index, process_count: this process and the number of processes
      (jax.process_index(), jax.process_count()).
    seed: shuffling and augmentation seed.
    train: shuffle and augment (else file order, every example once).
    num_epochs: training epochs to yield (None: forever); ignored for eval
      (one pass).
    start_step: first global step to yield (resuming).
    worker_count: Grain worker processes (0: decode in this process).

  Returns:
    A `StreamingIterator` of dicts: 'image' float32 [b, H, W, C] normalised,
    'label' int32 [b], and for evaluation 'mask' bool [b] (False for the
    padding of the last batch), with b = global_batch_size // process_count.
    Call `close()` when done to stop the workers.
  """
  import grain  # pylint: disable=g-import-not-at-top
  info = info_lib.dataset_info(name)
  arrays.check_split(split)
  if global_batch_size <= 0 or process_count <= 0 or not (
      0 <= process_index < process_count):
    raise ValueError(
        f'Bad sharding: global_batch_size={global_batch_size}, '
        f'process_index={process_index}, process_count={process_count}.')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible'
                     f' by process_count {process_count}.')
  if data_dir is None or str(data_dir) == '':
    raise ValueError(
        f'streaming_iterator reads an ImageFolder directory: set '
        f'config.data_dir to {name} prepared with train/ and val/ class '
        'folders (as for pytorch/examples/imagenet).')
  root = local.check_dir(data_dir)
  if not local.is_imagefolder(root):
    raise ValueError(f'streaming_iterator needs an ImageFolder data_dir; '
                     f'{str(root)!r} is not one.{local.layout_hint(root)} '
                     f'{local.LAYOUTS_HELP}')
  source = ImageFolderSource(root, split, info)
  n = len(source)
  if train:
    steps_per_epoch = n // global_batch_size
    if steps_per_epoch == 0:
      raise ValueError(f'global_batch_size {global_batch_size} exceeds the '
                       f'{n} training examples in {str(root)!r}.')
    num_steps = None if num_epochs is None else steps_per_epoch * num_epochs
  else:
    steps_per_epoch = -(-n // global_batch_size)
    num_steps = steps_per_epoch
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  local_batch = global_batch_size // process_count
  transform = LoadExample(
      source, info, train=train, seed=seed,
      global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, steps_per_epoch=steps_per_epoch)
  num_local = (sys.maxsize // global_batch_size * local_batch
               if num_steps is None else num_steps * local_batch)
  ds = (grain.MapDataset.range(num_local)
        .map(transform)
        .batch(local_batch, drop_remainder=True))
  ds = ds[start_step:]
  if worker_count is None:
    worker_count = default_worker_count()
  # Threads per worker: PIL releases the GIL while decoding.
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  return StreamingIterator(iter(it_ds), num_examples=n,
                           steps_per_epoch=steps_per_epoch,
                           num_steps=num_steps, classes=source.classes)
