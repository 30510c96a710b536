"""Tests of addernet_jax.data: layouts, splits, augmentation, TFDS, Grain."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from addernet_jax import data
from addernet_jax.data import arrays
from addernet_jax.data import info as info_lib
from addernet_jax.data import local
from addernet_jax.data import streaming
from addernet_jax.data import tfds_source

SHARED = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')


def _rand_images(rng, n, h, w, c):
  return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


# ------------------------------------------------------------ dataset_info --

def test_dataset_info_values():
  info = data.dataset_info('cifar10')
  assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
  assert info.mean == (0.4914, 0.4822, 0.4465)
  assert info.std == (0.2023, 0.1994, 0.2010)
  assert info.in_memory and (info.train_size, info.test_size) == (50000,
                                                                  10000)
  assert data.dataset_info('mnist').image_shape == (28, 28, 1)
  assert data.dataset_info('cifar100').num_classes == 100
  assert not data.dataset_info('imagenet2012').in_memory
  assert data.dataset_info('imagenet2012').image_shape == (224, 224, 3)


def test_dataset_info_unknown_name():
  with pytest.raises(ValueError, match=r"'svhn'.*cifar10.*imagenet2012"):
    data.dataset_info('svhn')


# ------------------------------------------------------------------ digits --

def test_digits_split_sizes_determinism_and_stats(caplog):
  x_tr, y_tr = data.load_arrays('digits', None, 'train')
  x_te, y_te = data.load_arrays('digits', None, 'test')
  info = data.dataset_info('digits')
  assert x_tr.shape == (info.train_size, 8, 8, 1) and x_tr.dtype == np.uint8
  assert x_te.shape == (info.test_size, 8, 8, 1) and y_te.dtype == np.int32
  assert len(y_tr) + len(y_te) == 1797
  # 17 grey levels (0..16) scaled to 0..255.
  assert set(np.unique(x_tr)) <= set(np.round(np.arange(17) * 255 / 16))
  assert x_tr.max() == 255
  # Stratified: every class has about 20% of its images in test.
  from sklearn.datasets import load_digits
  full = np.bincount(load_digits().target)
  np.testing.assert_array_equal(np.bincount(y_tr) + np.bincount(y_te), full)
  assert np.all(np.abs(np.bincount(y_te) - 0.2 * full) <= 0.5)
  # Disjoint: the split is a partition of the 1797 images (as multisets).
  all_rows = np.concatenate([x_tr, x_te]).reshape(1797, -1)
  ref = np.round(load_digits().images * 255 / 16).astype(np.uint8)
  assert sorted(map(bytes, all_rows)) == sorted(map(bytes,
                                                    ref.reshape(1797, -1)))
  with caplog.at_level(logging.WARNING, logger='addernet_jax.data.arrays'):
    x2, y2 = data.load_arrays('digits', '/nonexistent', 'test')
  assert "data_dir '/nonexistent' is not read" in caplog.text, caplog.text
  np.testing.assert_array_equal(x2, x_te)
  np.testing.assert_array_equal(y2, y_te)
  # The documented normalisation statistics are those of the training split.
  np.testing.assert_allclose((x_tr / 255).mean(), info.mean[0], atol=1e-4)
  np.testing.assert_allclose((x_tr / 255).std(), info.std[0], atol=1e-4)


# ------------------------------------------------------------- ImageFolder --

def _pad_classes(split_dir: Path, num_classes: int) -> None:
  """Adds empty class folders (sorted after the others) up to num_classes."""
  split_dir.mkdir(parents=True, exist_ok=True)
  have = sum(1 for p in split_dir.iterdir() if p.is_dir())
  for i in range(num_classes - have):
    (split_dir / f'zz_empty{i:04d}').mkdir()


def _interleaved(counts):
  """(class, rank) in the listing order: rank k of a class of n files at
  (k + 1/2) / n, ties in class order."""
  items = [(c, k) for c, n in enumerate(counts) for k in range(n)]
  return sorted(items, key=lambda ck: ((ck[1] + 0.5) / counts[ck[0]], ck[0]))


def _make_imagefolder(root: Path, shape=(32, 32, 3), classes=('cat', 'ant',
                      'zebra'), counts=(3, 2, 4), ext='png', seed=0,
                      splits=('train', 'test'), num_classes=10):
  """Random images; expected[split] = (images, labels) in listing order."""
  rng = np.random.default_rng(seed)
  expected = {}
  for split in splits:
    by_class = []
    for ci, cname in enumerate(sorted(classes)):
      n = counts[ci] + (1 if split == 'train' else 0)
      by_class.append([])
      for i in range(n):
        arr = _rand_images(rng, 1, *shape)[0]
        _save(arr, root / split / cname / f'{i:04d}.{ext}')
        by_class[-1].append(arr)
    _pad_classes(root / split, num_classes)
    order = _interleaved([len(b) for b in by_class])
    expected[split] = (np.stack([by_class[c][k] for c, k in order]),
                       np.asarray([c for c, _ in order]))
  return expected


def test_imagefolder_png_exact(tmp_path):
  expected = _make_imagefolder(tmp_path)
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  for split in ('train', 'test'):
    x, y = data.load_arrays('cifar10', str(tmp_path), split)
    assert x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x, expected[split][0])
    np.testing.assert_array_equal(y, expected[split][1])
  # Class index = position in the sorted folder names.
  _, _, classes = local.list_imagefolder(tmp_path, 'test')
  assert classes[:3] == ['ant', 'cat', 'zebra'] and len(classes) == 10


def test_imagefolder_val_dir_grey_jpeg(tmp_path):
  rng = np.random.default_rng(1)
  for c in range(3):
    for i in range(2):
      _save(_rand_images(rng, 1, 28, 28, 1)[0],
            tmp_path / 'val' / f'{c}' / f'{i}.jpg')
  _pad_classes(tmp_path / 'val', 10)
  x, y = data.load_arrays('mnist', tmp_path, 'test')
  assert x.shape == (6, 28, 28, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(y, [0, 1, 2, 0, 1, 2])
  assert x.std() > 20  # decoded content, not zeros
  with pytest.raises(ValueError, match='no train split'):
    data.load_arrays('mnist', tmp_path, 'train')


def test_imagefolder_decode_workers_match_in_process(tmp_path):
  expected = _make_imagefolder(tmp_path, counts=(3, 3, 3), splits=('test',))
  paths, _, _ = local.list_imagefolder(tmp_path, 'test')
  got = local.decode_images(paths, (32, 32, 3), num_workers=2, chunk=2)
  np.testing.assert_array_equal(got, expected['test'][0])


def test_imagefolder_wrong_size_and_channels(tmp_path):
  rng = np.random.default_rng(2)
  (tmp_path / 'train/b').mkdir(parents=True)
  _save(_rand_images(rng, 1, 32, 32, 3)[0], tmp_path / 'train/a/0.png')
  _pad_classes(tmp_path / 'train', 10)
  _save(_rand_images(rng, 1, 31, 32, 3)[0], tmp_path / 'train/a/1.png')
  with pytest.raises(ValueError, match=r'1\.png.*\(31, 32, 3\)'):
    data.load_arrays('cifar10', tmp_path, 'train')
  (tmp_path / 'train/a/1.png').unlink()
  _save(_rand_images(rng, 1, 32, 32, 1)[0], tmp_path / 'train/b/0.png')
  with pytest.raises(ValueError, match=r'\(32, 32, 1\).*expected \(32, 32, 3\)'):
    data.load_arrays('cifar10', tmp_path, 'train')


def test_imagefolder_too_many_classes(tmp_path):
  rng = np.random.default_rng(3)
  for c in range(11):
    _save(_rand_images(rng, 1, 32, 32, 3)[0], tmp_path / f'test/c{c:02d}/0.png')
  with pytest.raises(ValueError, match='11 class folders'):
    data.load_arrays('cifar10', tmp_path, 'test')


def _bad_image(path: Path, kind: str) -> None:
  """Writes a damaged `kind` of image file at path."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if kind in ('empty', 'text'):
    path.write_bytes(b'' if kind == 'empty' else b'not an image\n' * 20)
    return
  _save(_rand_images(np.random.default_rng(7), 1, 32, 32, 3)[0], path)
  raw = path.read_bytes()  # random pixels: a JPEG of about 2 kB
  path.write_bytes(raw[:300] if kind == 'cut300' else
                   raw[:int(0.8 * len(raw))])


@pytest.mark.parametrize('kind', ['trunc80', 'cut300', 'empty', 'text'])
def test_imagefolder_unreadable_file_names_it(tmp_path, kind):
  _make_imagefolder(tmp_path, ext='jpg', counts=(3, 3, 3))  # 12 in train/
  bad = tmp_path / 'train' / 'cat' / '0001.jpg'
  _bad_image(bad, kind)
  pattern = (re.escape(str(bad)) + r': cannot decode this image file '
             r'\(.*Error.*\).*remove it or replace it')
  with pytest.raises(local.ImageDecodeError, match=pattern) as e:
    data.load_arrays('cifar10', tmp_path, 'train')
  assert isinstance(e.value, ValueError)
  # The same through a pool of decoding processes (4 chunks of 3 files).
  paths, _, _ = local.list_imagefolder(tmp_path, 'train')
  with pytest.raises(local.ImageDecodeError, match=pattern):
    local.decode_images(paths, (32, 32, 3), num_workers=2, chunk=3)
  # And in the streaming pipeline, decoding in this process.
  it = data.streaming_iterator('cifar10', tmp_path, 'train',
                               global_batch_size=12, train=True, num_epochs=1,
                               worker_count=0)
  with pytest.raises(local.ImageDecodeError, match=pattern):
    _collect(it)
  it.close()
  # ImageNet-sized decoding (streaming._decode_large) too.
  with pytest.raises(local.ImageDecodeError, match=pattern):
    streaming._decode_large(str(bad), 224, False, None)


@pytest.mark.slow
def test_streaming_unreadable_file_in_grain_worker(tmp_path):
  """Grain re-raises a worker's exception with its type in the main
  process: the error still names the file."""
  _make_imagefolder(tmp_path, ext='jpg', counts=(2, 2, 2), splits=('train',))
  bad = tmp_path / 'train' / 'zebra' / '0000.jpg'
  _bad_image(bad, 'trunc80')
  it = data.streaming_iterator('cifar10', tmp_path, 'train',
                               global_batch_size=3, train=True, num_epochs=1,
                               worker_count=1)
  try:
    with pytest.raises(local.ImageDecodeError, match=re.escape(str(bad))):
      for _ in it:
        pass
  finally:
    it.close()


def test_a_dead_grain_worker_is_named(tmp_path):
  """A decode worker killed (the OOM killer) surfaced as Grain's raw
  RuntimeError traceback; now one DataWorkerError (a user error: one line)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  _make_imagefolder(tmp_path, ext='jpg', counts=(20, 20, 20),
                    splits=('train',))
  it = data.streaming_iterator('cifar10', tmp_path, 'train',
                               global_batch_size=3, train=True, num_epochs=50,
                               worker_count=1)
  try:
    next(it)
    workers = multiprocessing.active_children()  # Grain's (named by version)
    assert workers
    for worker in workers:
      os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(data.DataWorkerError, match=r'a data-loading worker '
                       r'process died \(killed by signal 9, often the '
                       r'out-of-memory killer\): lower --config.num_workers'):
      for _ in range(2000):
        next(it)
  finally:
    it.close()


def test_imagefolder_listing_interleaved_by_class(tmp_path):
  """Files are listed interleaved by class, so that holdout_examples (the
  last N training examples) and eval_max_examples (the first N evaluation
  examples) keep the class balance."""
  rng = np.random.default_rng(8)
  for c in range(10):
    for i in range(4 if c != 2 else 8):
      _save(_rand_images(rng, 1, 32, 32, 3)[0],
            tmp_path / 'train' / f'c{c}' / f'{i:02d}.png')
    for i in range(3):
      _save(_rand_images(rng, 1, 32, 32, 3)[0],
            tmp_path / 'test' / f'c{c}' / f'{i:02d}.png')
  paths, labels, _ = local.list_imagefolder(tmp_path, 'test')
  np.testing.assert_array_equal(labels, np.tile(np.arange(10), 3))
  assert [Path(p).name for p in paths[:11]] == ['00.png'] * 10 + ['01.png']
  # Class c2 has 8 files, at (k + 1/2) / 8 of the list: 1/16, 3/16, 5/16..;
  # the others 4, at 1/8, 3/8...
  paths, labels, _ = local.list_imagefolder(tmp_path, 'train')
  assert [Path(p).relative_to(tmp_path / 'train').as_posix()
          for p in paths[:13]] == (
              ['c2/00.png', 'c0/00.png', 'c1/00.png'] +
              [f'c{c}/00.png' for c in range(3, 10)] +
              ['c2/01.png', 'c2/02.png', 'c0/01.png'])
  assert sorted(paths) == sorted(str(p) for p in (tmp_path / 'train').rglob(
      '*.png'))  # every file once
  for n in (11, 22, 33):  # any prefix or suffix: each class's share
    for part in (labels[:n], labels[-n:]):
      counts = np.bincount(part, minlength=10)
      np.testing.assert_allclose(counts, n * np.bincount(labels) / 44,
                                 atol=1)
  train, (_, y_eval) = data.load_in_memory_splits(
      'cifar10', tmp_path, holdout_examples=11)
  np.testing.assert_array_equal(np.bincount(y_eval), [1, 1, 2] + [1] * 7)
  assert len(train[1]) == 33
  _, (_, y_eval) = data.load_in_memory_splits('cifar10', tmp_path,
                                              eval_max_examples=10)
  np.testing.assert_array_equal(y_eval, np.arange(10))


def test_holdout_and_eval_limit_keep_images_with_their_labels(tmp_path):
  """The held-out split and the eval_max_examples prefix keep each image
  with its label: images taken from the wrong end of the list passed, as
  only the labels and shapes were checked."""
  expected = _make_imagefolder(tmp_path, counts=(3, 2, 4))
  x, y = expected['train']  # 12 examples in listing order
  train, (xe, ye) = data.load_in_memory_splits(
      'cifar10', tmp_path, holdout_examples=4, eval_max_examples=3)
  np.testing.assert_array_equal(train[0], x[:-4])
  np.testing.assert_array_equal(train[1], y[:-4])
  np.testing.assert_array_equal(xe, x[-4:-1])
  np.testing.assert_array_equal(ye, y[-4:-1])
  _, (xt, yt) = data.load_in_memory_splits('cifar10', tmp_path,
                                           eval_max_examples=5)
  np.testing.assert_array_equal(xt, expected['test'][0][:5])
  np.testing.assert_array_equal(yt, expected['test'][1][:5])
  train, (x1, _) = data.load_in_memory_splits('cifar10', tmp_path,
                                              holdout_examples=1)
  np.testing.assert_array_equal(x1, x[-1:])
  np.testing.assert_array_equal(train[0], x[:-1])


def test_imagefolder_class_count_must_match_dataset(tmp_path):
  expected = _make_imagefolder(tmp_path, classes=[f'c{c}' for c in range(10)],
                               counts=[1] * 10, num_classes=10)
  assert len(expected['train'][1]) == 20
  # CIFAR-10 folders for CIFAR-100.
  for split in ('train', 'test'):
    with pytest.raises(ValueError, match=r'10 class folders in .*train.*'
                       r'fewer than the 100 classes of cifar100'):
      data.load_arrays('cifar100', tmp_path, split)
  # A class missing from test/ only keeps train's indices.
  shutil.rmtree(tmp_path / 'test' / 'c3')
  _, y = data.load_arrays('cifar10', tmp_path, 'test')
  np.testing.assert_array_equal(y, [0, 1, 2, 4, 5, 6, 7, 8, 9])
  # Missing from train/ (and test/): later classes would shift by one.
  shutil.rmtree(tmp_path / 'train' / 'c3')
  for split in ('train', 'test'):
    with pytest.raises(ValueError, match=r"9 class folders in '.*train', "
                       r'fewer than the 10 classes of cifar10'):
      data.load_arrays('cifar10', tmp_path, split)
  with pytest.raises(ValueError, match='9 class folders.*fewer than the 10'):
    data.streaming_iterator('cifar10', tmp_path, 'test', global_batch_size=2,
                            train=False, worker_count=0)
  # Without train/, the split's own folders define the classes.
  shutil.rmtree(tmp_path / 'train')
  with pytest.raises(ValueError, match=r"9 class folders in '.*test'"):
    data.load_arrays('cifar10', tmp_path, 'test')


def test_imagefolder_hidden_entries_ignored(tmp_path):
  expected = _make_imagefolder(tmp_path)
  for split in ('train', 'test'):  # Jupyter's and macOS's leftovers
    _bad_image(tmp_path / split / '.ipynb_checkpoints' / 'x.jpg', 'text')
    _bad_image(tmp_path / split / 'cat' / '._0000.jpg', 'text')
    (tmp_path / split / 'cat' / '.ipynb_checkpoints').mkdir()
  for split in ('train', 'test'):
    x, y = data.load_arrays('cifar10', tmp_path, split)
    np.testing.assert_array_equal(x, expected[split][0])
    np.testing.assert_array_equal(y, expected[split][1])
  it = data.streaming_iterator('cifar10', tmp_path, 'test',
                               global_batch_size=9, train=False,
                               worker_count=0)
  assert it.num_examples == 9 and '.ipynb_checkpoints' not in it.classes
  it.close()
  only_hidden = tmp_path / 'other'
  _bad_image(only_hidden / 'train' / '.ipynb_checkpoints' / 'a.png', 'text')
  assert not local.is_imagefolder(only_hidden)


def test_imagefolder_cache_reused_and_damaged_entry_rebuilt(
    tmp_path, monkeypatch, caplog):
  expected = _make_imagefolder(tmp_path / 'd', splits=('test',))
  cache = tmp_path / 'cache' / 'sub'  # created when missing
  monkeypatch.setenv(arrays.CACHE_ENV, str(cache))
  x, y = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  np.testing.assert_array_equal(x, expected['test'][0])
  [entry] = cache.glob('cifar10-test-*.npz')
  decode = local.decode_images

  def no_decode(*args, **kwargs):
    raise AssertionError('decoded although the cache entry is valid')

  monkeypatch.setattr(local, 'decode_images', no_decode)
  x, y = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  np.testing.assert_array_equal(x, expected['test'][0])
  np.testing.assert_array_equal(y, expected['test'][1])
  monkeypatch.setattr(local, 'decode_images', decode)
  valid = entry.read_bytes()
  np.savez(tmp_path / 'other.npz', images=x[:2], labels=y[:2])
  for damage in (valid[:len(valid) // 2], b'not a zip file',
                 (tmp_path / 'other.npz').read_bytes()):
    entry.write_bytes(damage)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      x, y = data.load_arrays('cifar10', tmp_path / 'd', 'test')
    np.testing.assert_array_equal(x, expected['test'][0])
    np.testing.assert_array_equal(y, expected['test'][1])
    assert f'damaged {arrays.CACHE_ENV} cache entry {entry}' in caplog.text
    with np.load(entry) as f:  # rewritten whole
      np.testing.assert_array_equal(f['images'], expected['test'][0])
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]


def test_imagefolder_cache_follows_relabelling_and_rewritten_files(
    tmp_path, monkeypatch):
  """A cache entry must not outlive a change of labels or pixels (a class
  folder renamed so that the class indices shift, the same image paths; an
  image rewritten with the same size): a key of paths and sizes alone,
  without a check of the labels, passed."""
  expected = _make_imagefolder(tmp_path / 'd', splits=('test',), ext='bmp')
  monkeypatch.setenv(arrays.CACHE_ENV, str(tmp_path / 'cache'))
  _, y = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  np.testing.assert_array_equal(y, expected['test'][1])
  # An empty padding class renamed to sort first: every label shifts by one.
  test_dir = tmp_path / 'd' / 'test'
  (test_dir / 'zz_empty0000').rename(test_dir / 'Aempty')
  _, y2 = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  np.testing.assert_array_equal(y2, expected['test'][1] + 1)
  # The same-size BMP rewritten with other pixels (a later mtime).
  first = sorted((test_dir / 'ant').glob('*.bmp'))[0]
  size = first.stat().st_size
  new = np.full((32, 32, 3), 7, np.uint8)
  Image.fromarray(new).save(first)
  assert first.stat().st_size == size
  st = first.stat()
  os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  x3, _ = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  paths, _, _ = local.list_imagefolder(tmp_path / 'd', 'test')
  np.testing.assert_array_equal(x3[paths.index(str(first))], new)


def test_imagefolder_cache_dir_errors(tmp_path, monkeypatch, caplog):
  expected = _make_imagefolder(tmp_path / 'd', splits=('test',))
  (tmp_path / 'text.pth').write_text('a file')
  monkeypatch.setenv(arrays.CACHE_ENV, str(tmp_path / 'text.pth'))
  with pytest.raises(ValueError, match=(
      f"{arrays.CACHE_ENV}='{tmp_path}/text.pth' is a file, not a "
      'directory')):
    data.load_arrays('cifar10', tmp_path / 'd', 'test')
  monkeypatch.setenv(arrays.CACHE_ENV, str(tmp_path / 'text.pth' / 'sub'))
  with pytest.raises(ValueError, match=(
      f"{arrays.CACHE_ENV}='{tmp_path}/text.pth/sub': cannot create")):
    data.load_arrays('cifar10', tmp_path / 'd', 'test')
  # A cache that cannot be written is skipped with a warning.
  monkeypatch.setenv(arrays.CACHE_ENV, str(tmp_path / 'cache'))

  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(arrays.np, 'savez', full_disk)
  with caplog.at_level(logging.WARNING):
    x, _ = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  np.testing.assert_array_equal(x, expected['test'][0])
  assert 'cannot write the cache entry' in caplog.text
  assert not list((tmp_path / 'cache').iterdir())


@pytest.mark.parametrize('cached', [False, True])
def test_imagefolder_progress_bar_can_be_hidden(tmp_path, monkeypatch, capsys,
                                                cached):
  _make_imagefolder(tmp_path / 'd', splits=('train', 'test'))
  monkeypatch.setattr(local, '_BAR_MIN_FILES', 1)
  if cached:
    monkeypatch.setenv(arrays.CACHE_ENV, str(tmp_path / 'cache'))
  else:
    monkeypatch.delenv(arrays.CACHE_ENV, raising=False)
  capsys.readouterr()
  data.load_in_memory_splits('cifar10', tmp_path / 'd', progress_bar=False)
  assert 'img' not in capsys.readouterr().err
  if cached:
    for entry in (tmp_path / 'cache').iterdir():
      entry.unlink()
  data.load_in_memory_splits('cifar10', tmp_path / 'd')
  err = capsys.readouterr().err
  assert 'cifar10 test (d)' in err and 'cifar10 train (d)' in err


def test_data_dir_hints_archive_and_split_folder(tmp_path):
  _make_imagefolder(tmp_path / 'folder', classes=[f'c{c}' for c in range(10)],
                    counts=[1] * 10)
  archive = tmp_path / 'cifar10-jpeg.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tmp_path / 'folder', arcname='cifar10-jpeg')
  with pytest.raises(ValueError, match=r'is not a directory\. It is an '
                     r'archive: extract it first'):
    data.load_arrays('cifar10', archive, 'train')

  def refused_by_both_loaders(root, pattern):
    with pytest.raises(ValueError, match=pattern):
      data.load_arrays('cifar10', root, 'train')
    with pytest.raises(ValueError, match=pattern):
      data.streaming_iterator('cifar10', root, 'train', global_batch_size=2,
                              train=True, worker_count=0)

  split = tmp_path / 'folder' / 'train'
  parent = re.escape(repr(str(split.parent)))
  refused_by_both_loaders(
      split, f'single ImageFolder split .* pass its parent {parent}')
  # Extracted as the message says (tar xzf FILE -C DIR), then DIR passed.
  extracted = tmp_path / 'extracted'
  extracted.mkdir()
  with tarfile.open(archive) as tar:
    tar.extractall(extracted)
  inner = re.escape(repr(str(extracted / 'cifar10-jpeg')))
  refused_by_both_loaders(
      extracted, f"sub-folder 'cifar10-jpeg' holds a known layout: pass "
      f'{inner}')
  np.testing.assert_array_equal(
      data.load_arrays('cifar10', extracted / 'cifar10-jpeg', 'train')[1],
      data.load_arrays('cifar10', tmp_path / 'folder', 'train')[1])
  holder = tmp_path / 'holder'
  holder.mkdir()
  shutil.copy(archive, holder)
  with pytest.raises(ValueError, match=r'holds archives \(cifar10-jpeg\.tar'
                     r'\.gz\): extract them first'):
    data.load_arrays('cifar10', holder, 'train')


# ------------------------------------------------------------------- CIFAR --

def _write_cifar10(folder: Path, rng, sizes=(5, 4), test=3):
  folder.mkdir(parents=True)
  out = {}
  imgs, labels = [], []
  for b, n in enumerate(sizes, 1):
    x = _rand_images(rng, n, 32, 32, 3)
    y = rng.integers(0, 10, n).tolist()
    with open(folder / f'data_batch_{b}', 'wb') as f:
      pickle.dump({b'batch_label': b'training batch', b'labels': y,
                   b'data': x.transpose(0, 3, 1, 2).reshape(n, 3072),
                   b'filenames': [b'x.png'] * n}, f, protocol=2)
    imgs.append(x)
    labels += y
  out['train'] = (np.concatenate(imgs), np.asarray(labels))
  x = _rand_images(rng, test, 32, 32, 3)
  y = rng.integers(0, 10, test).tolist()
  with open(folder / 'test_batch', 'wb') as f:
    pickle.dump({b'labels': y, b'data': x.transpose(0, 3, 1, 2).reshape(
        test, 3072)}, f)
  out['test'] = (x, np.asarray(y))
  return out


@pytest.mark.parametrize('nested', [False, True])
def test_cifar10_pickles(tmp_path, nested):
  rng = np.random.default_rng(4)
  folder = tmp_path / 'cifar-10-batches-py' if nested else tmp_path / 'c'
  expected = _write_cifar10(folder, rng)
  root = tmp_path if nested else folder
  for split in ('train', 'test'):
    x, y = data.load_arrays('cifar10', root, split)
    np.testing.assert_array_equal(x, expected[split][0])
    np.testing.assert_array_equal(y, expected[split][1])
  # The row layout is channel planes: pixel (0, 1) red is byte 1.
  raw = pickle.load(open(folder / 'test_batch', 'rb'), encoding='bytes')
  x, _ = data.load_arrays('cifar10', root, 'test')
  assert x[0, 0, 1, 0] == raw[b'data'][0, 1]
  assert x[0, 0, 0, 2] == raw[b'data'][0, 2048]


def test_cifar100_pickles(tmp_path):
  rng = np.random.default_rng(5)
  folder = tmp_path / 'cifar-100-python'
  folder.mkdir()
  expected = {}
  for split, n in (('train', 6), ('test', 4)):
    x = _rand_images(rng, n, 32, 32, 3)
    fine = rng.integers(0, 100, n).tolist()
    with open(folder / split, 'wb') as f:
      pickle.dump({b'data': x.transpose(0, 3, 1, 2).reshape(n, 3072),
                   b'fine_labels': fine,
                   b'coarse_labels': [v // 5 for v in fine]}, f)
    expected[split] = (x, fine)
  with open(folder / 'meta', 'wb') as f:
    pickle.dump({b'fine_label_names': [b'x'] * 100}, f)
  for split in ('train', 'test'):
    x, y = data.load_arrays('cifar100', tmp_path, split)
    np.testing.assert_array_equal(x, expected[split][0])
    np.testing.assert_array_equal(y, expected[split][1])
  with pytest.raises(ValueError, match='cifar100 pickles, not cifar10'):
    data.load_arrays('cifar10', tmp_path, 'train')


def test_cifar_labels_out_of_range_and_bad_rows(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  x = _rand_images(np.random.default_rng(6), 2, 32, 32, 3)
  with open(folder / 'test_batch', 'wb') as f:
    pickle.dump({b'labels': [3, 10], b'data': x.reshape(2, 3072)}, f)
  with pytest.raises(ValueError, match=r'labels range from 3 to 10'):
    data.load_arrays('cifar10', tmp_path, 'test')
  with open(folder / 'test_batch', 'wb') as f:
    pickle.dump({b'labels': [3, 1], b'data': x.reshape(2, -1)[:, :3000]}, f)
  with pytest.raises(ValueError, match=r'\(2, 3000\)'):
    data.load_arrays('cifar10', tmp_path, 'test')
  with pytest.raises(ValueError, match=(
      r'no train split.*eval\.py: --config\.recalibrate_bn_batches=0')):
    data.load_arrays('cifar10', tmp_path, 'train')


def _pickled(obj) -> bytes:
  return pickle.dumps(obj, protocol=2)


_ROWS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize('content, problem', [
    (_pickled({b'data': _ROWS, b'labels': [1, 2]})[:40],
     'truncated or corrupt pickle (UnpicklingError: pickle data was '
     'truncated)'),
    (b'hello world', 'truncated or corrupt pickle (UnpicklingError: Memo'),
    (b'garbage\n', 'truncated or corrupt pickle (ValueError: invalid literal'),
    (b'', 'truncated or corrupt pickle (EOFError'),
    (_pickled([1, 2]), 'the pickle holds a list, not the dict of a CIFAR'),
    (_pickled({b'images': _ROWS, b'labels': [1, 2]}),
     "not a cifar10 batch (keys ['images', 'labels']; 'data' and 'labels' "
     'expected)'),
    (_pickled({b'data': 'abc', b'labels': [1]}),
     "'data' or 'labels' is not an integer array"),
    (_pickled({b'data': _ROWS[:, :3000], b'labels': [1, 2]}),
     'data has shape (2, 3000), expected [N, 3072]'),
    (_pickled({b'data': _ROWS, b'labels': [1]}),
     "2 images but 'labels' of shape (1,)"),
], ids=['truncated', 'hello', 'garbage', 'empty', 'list', 'keys', 'not_ints',
        'row_size', 'label_count'])
def test_cifar_damaged_pickle_names_file(tmp_path, content, problem):
  folder = tmp_path / 'cifar-10-batches-py'
  _write_cifar10(folder, np.random.default_rng(10))
  (folder / 'data_batch_2').write_bytes(content)
  (folder / 'test_batch').write_bytes(content)
  for split, name in (('train', 'data_batch_2'), ('test', 'test_batch')):
    with pytest.raises(ValueError) as e:
      data.load_arrays('cifar10', tmp_path, split)
    assert type(e.value) is ValueError
    assert str(e.value).startswith(
        f"cannot read CIFAR file '{folder / name}': {problem}")
    assert str(e.value).endswith('replace it with an intact copy (e.g. '
                                 'download it again).')


class _RunsCode:
  """Pickles as a call of os.system: what a crafted data file could hold."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_cifar_pickles_load_numpy_arrays_only(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  rng = np.random.default_rng(12)
  _write_cifar10(folder, rng)
  rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
  for protocol in (2, 4, 5):  # every protocol NumPy arrays come in
    (folder / 'test_batch').write_bytes(pickle.dumps(
        {b'data': rows, b'labels': [1, 2]}, protocol=protocol))
    images, labels = data.load_arrays('cifar10', tmp_path, 'test')
    np.testing.assert_array_equal(
        images, rows.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(labels, [1, 2])
  marker = tmp_path / 'ran'
  (folder / 'test_batch').write_bytes(pickle.dumps(
      {b'data': _RunsCode(marker), b'labels': [1]}, protocol=2))
  with pytest.raises(ValueError, match=(
      r"cannot read CIFAR file '.*test_batch': it names (posix|nt)\.system, "
      r'which a CIFAR batch never holds \(refused')):
    data.load_arrays('cifar10', tmp_path, 'test')
  assert not marker.exists()


def test_other_datasets_files_are_named(tmp_path):
  rng = np.random.default_rng(11)
  _write_mnist(tmp_path / 'm', 'train', 3, rng, gz=True)
  with pytest.raises(ValueError, match=(
      r"'.*m' holds MNIST IDX files \(train-images-idx3-ubyte\.gz, "
      r'train-labels-idx1-ubyte\.gz\), not cifar10 data: set the dataset to '
      r'mnist \(train\.py, eval\.py: --config\.dataset=mnist\)')):
    data.load_arrays('cifar10', tmp_path / 'm', 'test')
  _write_cifar10(tmp_path / 'c' / 'cifar-10-batches-py', rng)
  with pytest.raises(ValueError, match=(
      r"'.*c' holds cifar10 pickles, not mnist data: set the dataset to "
      r'cifar10 \(train\.py, eval\.py: --config\.dataset=cifar10\)')):
    data.load_arrays('mnist', tmp_path / 'c', 'test')


# ------------------------------------------------------------------- MNIST --

def _idx_bytes(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, arr.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in arr.shape)
  return header + arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, prefix: str, n: int, rng, gz: bool, sep='-'):
  folder.mkdir(parents=True, exist_ok=True)
  x = _rand_images(rng, n, 28, 28, 1)[..., 0]
  y = rng.integers(0, 10, n).astype(np.uint8)
  for kind, arr, nd in (('images', x, 3), ('labels', y, 1)):
    name = f'{prefix}-{kind}{sep}idx{nd}-ubyte' + ('.gz' if gz else '')
    payload = _idx_bytes(arr)
    (folder / name).write_bytes(gzip.compress(payload) if gz else payload)
  return x, y


@pytest.mark.parametrize('gz', [True, False])
def test_mnist_idx(tmp_path, gz):
  rng = np.random.default_rng(7)
  x_tr, y_tr = _write_mnist(tmp_path, 'train', 7, rng, gz)
  x_te, y_te = _write_mnist(tmp_path, 't10k', 5, rng, gz)
  x, y = data.load_arrays('mnist', tmp_path, 'train')
  assert x.shape == (7, 28, 28, 1)
  np.testing.assert_array_equal(x[..., 0], x_tr)
  np.testing.assert_array_equal(y, y_tr)
  x, y = data.load_arrays('mnist', tmp_path, 'test')
  np.testing.assert_array_equal(x[..., 0], x_te)
  np.testing.assert_array_equal(y, y_te)


def test_mnist_eval_needs_only_t10k_torchvision_layout(tmp_path):
  rng = np.random.default_rng(8)
  x_te, y_te = _write_mnist(tmp_path / 'MNIST' / 'raw', 't10k', 3, rng,
                            gz=False, sep='.')
  x, y = data.load_arrays('mnist', tmp_path, 'test')
  np.testing.assert_array_equal(x[..., 0], x_te)
  np.testing.assert_array_equal(y, y_te)
  with pytest.raises(ValueError, match=(
      r'lack the train pair.*train-images.*an evaluation reads it only to '
      r're-estimate the BatchNorm statistics, which recalibrate_bn_batches=0 '
      r'skips \(eval\.py: --config\.recalibrate_bn_batches=0\)')):
    data.load_arrays('mnist', tmp_path, 'train')
  # Without the test pair: holdout_examples, with both callers' syntax.
  _write_mnist(tmp_path / 'tr', 'train', 3, rng, gz=False)
  with pytest.raises(ValueError, match=(
      r'lack the test pair.*set holdout_examples=10000 \(train\.py, '
      r'eval\.py: --config\.holdout_examples=10000; addernet_jax\.figures: '
      r'--holdout_examples 10000\)')):
    data.load_arrays('mnist', tmp_path / 'tr', 'test')


def test_mnist_corrupt_idx(tmp_path):
  rng = np.random.default_rng(9)
  _write_mnist(tmp_path, 't10k', 3, rng, gz=False)
  p = tmp_path / 't10k-images-idx3-ubyte'
  raw = bytearray(p.read_bytes())
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / p.name).write_bytes(bytes(raw[:-5]))
  (tmp_path / 'bad' / 't10k-labels-idx1-ubyte').write_bytes(
      (tmp_path / 't10k-labels-idx1-ubyte').read_bytes())
  with pytest.raises(ValueError, match=(
      f"cannot read MNIST file '{tmp_path / 'bad' / p.name}': "
      r'header says shape \(3, 28, 28\) \(2352 bytes\) but the file has '
      r'2347 bytes of data; replace it')):
    data.load_arrays('mnist', tmp_path / 'bad', 'test')
  raw[2] = 0x0D  # float data
  p.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=(
      f"cannot read MNIST file '{p}': not an unsigned-byte IDX")):
    data.load_arrays('mnist', tmp_path, 'test')
  # Gzip data without the .gz suffix.
  p.write_bytes(gzip.compress(_idx_bytes(np.zeros((3, 28, 28)))))
  with pytest.raises(ValueError, match='holds gzip data: add .gz to its name'):
    data.load_arrays('mnist', tmp_path, 'test')
  p.write_bytes(b'\0\0\x08')
  with pytest.raises(ValueError, match=(
      f"'{p}': 3 bytes, too short for an IDX header")):
    data.load_arrays('mnist', tmp_path, 'test')
  # Images and labels of different counts: both files are named.
  p.write_bytes(_idx_bytes(np.zeros((4, 28, 28))))
  with pytest.raises(ValueError, match=(
      f"MNIST files '{p}' \\(4 images\\) and "
      f"'{tmp_path / 't10k-labels-idx1-ubyte'}' \\(3 labels\\) do not "
      'match')):
    data.load_arrays('mnist', tmp_path, 'test')


@pytest.mark.parametrize('damage', ['truncated', 'not_gzip', 'corrupt',
                                    'bad_crc', 'empty'])
def test_mnist_damaged_gzip_names_file(tmp_path, damage):
  _write_mnist(tmp_path, 'train', 40, np.random.default_rng(12), gz=True)
  p = tmp_path / 'train-images-idx3-ubyte.gz'
  packed = gzip.compress(_idx_bytes(np.tile(np.arange(28, dtype=np.uint8),
                                            (40, 28, 1))))
  problem = {'truncated': 'truncated gzip stream (Compressed file ended',
             'empty': '0 bytes once unzipped, too short for an IDX header',
             'not_gzip': "not a gzip file despite its .gz name (Not a gzipped "
                         "file (b'no'))",
             'corrupt': 'corrupt gzip stream (Error -3 while decompressing',
             'bad_crc': 'corrupt gzip stream (CRC check failed'}[damage]
  if damage == 'truncated':
    content = packed[:len(packed) // 2]
  elif damage == 'empty':
    content = b''
  elif damage == 'not_gzip':
    content = b'no gzip here'
  elif damage == 'corrupt':
    content = packed[:12] + bytes(40) + packed[52:]
  else:
    content = packed[:-8] + bytes(4) + packed[-4:]
  p.write_bytes(content)
  with pytest.raises(ValueError) as e:
    data.load_arrays('mnist', tmp_path, 'train')
  assert type(e.value) is ValueError
  assert str(e.value).startswith(f"cannot read MNIST file '{p}': {problem}")
  assert str(e.value).endswith('; replace it with an intact copy (e.g. '
                               'download it again).')


def test_mnist_shared_training_set():
  folder = SHARED / 'mnist'
  if not (folder / 'train-images-idx3-ubyte.gz').is_file():
    pytest.skip(f'shared MNIST data not found at {folder}')
  md5 = {'train-images-idx3-ubyte.gz': '6bbc9ace898e44ae57da46a324031adb',
         'train-labels-idx1-ubyte.gz': 'a25bea736e30d166cdddb491f175f624'}
  for name, digest in md5.items():
    with gzip.open(folder / name, 'rb') as f:
      assert hashlib.md5(f.read()).hexdigest() == digest
  x, y = data.load_arrays('mnist', str(folder), 'train')
  assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
  assert y.shape == (60000,) and y.dtype == np.int32
  np.testing.assert_array_equal(y[:8], [5, 0, 4, 1, 9, 2, 1, 3])
  np.testing.assert_array_equal(
      np.bincount(y), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                       5949])
  assert 33.0 < x.mean() < 33.5  # the well-known MNIST mean 0.1307 * 255
  with pytest.raises(ValueError,
                     match=r't10k.*--config\.holdout_examples=10000'):
    data.load_arrays('mnist', str(folder), 'test')
  train, (x_eval, y_eval) = data.load_in_memory_splits(
      'mnist', str(folder), holdout_examples=10000, eval_max_examples=500)
  np.testing.assert_array_equal(train[1], y[:50000])
  np.testing.assert_array_equal(y_eval, y[50000:50500])
  assert x_eval.shape == (500, 28, 28, 1)
  no_train, (_, y_only) = data.load_in_memory_splits(
      'mnist', str(folder), holdout_examples=10000, with_train=False)
  assert no_train is None and len(y_only) == 10000
  with pytest.raises(ValueError, match='holdout_examples=60000 must be'):
    data.load_in_memory_splits('mnist', str(folder), holdout_examples=60000)


# ---------------------------------------------------------- CIFAR-10 JPEG --

@pytest.fixture(scope='module')
def cifar10_jpeg_test(tmp_path_factory):
  tarball = SHARED / 'cifar10-jpeg.tar.gz'
  if not tarball.is_file():
    pytest.skip(f'shared CIFAR-10 JPEG tarball not found at {tarball}')
  out = tmp_path_factory.mktemp('cifar10jpeg')
  if shutil.which('tar'):  # several times faster than the tarfile module
    subprocess.run(['tar', 'xzf', str(tarball), '-C', str(out),
                    'cifar10-jpeg/test'], check=True)
    return out / 'cifar10-jpeg'
  with tarfile.open(tarball) as tar:
    members = []
    for m in tar:  # test/ comes first in the archive: stop after it
      if m.name.startswith('cifar10-jpeg/train/'):
        break
      if m.name.startswith('cifar10-jpeg/test/'):
        members.append(m)
    tar.extractall(out, members=members, filter='data')
  return out / 'cifar10-jpeg'


def test_cifar10_jpeg_test_folder(cifar10_jpeg_test):
  t = time.perf_counter()
  x, y = data.load_arrays('cifar10', cifar10_jpeg_test, 'test')
  print(f'CIFAR-10 JPEG test split loaded in {time.perf_counter() - t:.1f} s')
  assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(y), [1000] * 10)
  paths, labels, classes = local.list_imagefolder(cifar10_jpeg_test, 'test')
  assert tuple(classes) == CIFAR10_CLASSES
  np.testing.assert_array_equal(labels, y)
  # Interleaved by class (equal classes: file k of every class, then k + 1):
  # every prefix (eval_max_examples) keeps the class balance.
  np.testing.assert_array_equal(y, np.tile(np.arange(10), 1000))
  assert paths[:2] == [str(cifar10_jpeg_test / 'test' / c / '0000.jpg')
                       for c in CIFAR10_CLASSES[:2]]
  # Files are ranked within their class in the original test order: the
  # lossless copies of the first original test images must match their JPEG
  # (27-33 dB PSNR re-encoding) and the label order airplane=0..truck=9.
  ref = SHARED / 'official-resnet20' / 'cifar10_test_lossless_297.npz'
  if not ref.is_file():
    return
  d = np.load(ref)
  idx = [int(m.group(1)) if (m := re.search(r'test idx (\d+)', s)) else -1
         for s in d['source']]
  sel = [i for i, v in enumerate(idx) if v >= 0]
  assert [idx[i] for i in sel] == list(range(len(sel)))
  seen = np.zeros(10, int)
  for i in sel:
    label = int(d['labels'][i])
    rank = seen[label]
    seen[label] += 1
    img = x[rank * 10 + label]
    mse = np.mean((img.astype(float) - d['images'][i]) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 24, (i, label, rank)


# ------------------------------------------------------------------ errors --

def test_directory_errors(tmp_path):
  with pytest.raises(ValueError, match='does not exist.*Accepted layouts'):
    data.load_arrays('cifar10', tmp_path / 'nope', 'train')
  with pytest.raises(ValueError, match='is empty.*Accepted layouts'):
    data.load_arrays('cifar10', tmp_path, 'train')
  (tmp_path / 'readme.txt').write_text('hello')
  with pytest.raises(ValueError, match=r"(?s)Unrecognised layout.*readme\.txt.*"
                     r'ImageFolder.*CIFAR python pickles.*MNIST IDX.*'
                     r'TensorFlow Datasets'):
    data.load_arrays('cifar10', tmp_path, 'train')
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    data.load_arrays('cifar10', tmp_path, 'validation')
  with pytest.raises(ValueError, match='streaming_iterator'):
    data.load_arrays('imagenet2012', tmp_path, 'train')
  with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
    data.load_arrays('cifar', tmp_path, 'train')


# -------------------------------------------------------------------- TFDS --

def test_tfds_missing_or_offline_fails_fast(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  # Not TFDS's host (here TCP connects may be accepted by a proxy): the probe
  # must fail, through its TLS handshake or its timeout.
  monkeypatch.setattr(tfds_source, '_PROBE_HOST', ('10.255.255.1', 9))
  monkeypatch.setattr(tfds_source, 'PROBE_TIMEOUT_S', 2.0)
  calls = []
  fake = types.ModuleType('tensorflow_datasets')
  fake.load = lambda *a, **k: calls.append((a, k))
  real_installed = 'tensorflow_datasets' in sys.modules or _importable(
      'tensorflow_datasets')
  if not real_installed:
    t = time.perf_counter()
    with pytest.raises(data.DataUnavailableError, match=r'(?s)not installed.*pip install '
                       r'tensorflow-datasets.*config\.data_dir'):
      data.load_arrays('cifar10', None, 'train')
    assert time.perf_counter() - t < 10
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake)
  t = time.perf_counter()
  with pytest.raises(data.DataUnavailableError, match=r'(?s)network is unreachable.*'
                     r'config\.data_dir.*ImageFolder'):
    data.load_arrays('mnist', None, 'test')
  assert time.perf_counter() - t < 10
  assert not calls


def _importable(mod: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(mod) is not None


def test_tfds_prepared_local_data_dir(monkeypatch, tmp_path):
  _prepare_tfds(tmp_path, 'cifar10', '3.0.2')
  x = _rand_images(np.random.default_rng(10), 4, 32, 32, 3)
  y = np.array([1, 9, 0, 3])
  calls = _fake_tfds(monkeypatch, x, y)
  gx, gy = data.load_arrays('cifar10', tmp_path, 'test')
  np.testing.assert_array_equal(gx, x)
  np.testing.assert_array_equal(gy, y)
  assert calls[0][0] == 'cifar10' and calls[0][1]['split'] == 'test'
  assert calls[0][1]['data_dir'] == str(tmp_path)


# ------------------------------------------------------------ augmentation --

def _coded_images(n, rng):
  """Channel 0 = row + 10, channel 1 = column + 10, channel 2 random, so the
  source pixel of every output pixel can be read back."""
  rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
  img = np.zeros((n, 32, 32, 3), np.uint8)
  img[..., 0] = rows + 10
  img[..., 1] = cols + 10
  img[..., 2] = rng.integers(0, 256, (n, 32, 32))
  return img


def _np_reference(img, top, left, flip, mean, std):
  """torchvision: RandomCrop(32, padding=4) (zero fill), flip, ToTensor,
  Normalize, in float64."""
  padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
  win = padded[top:top + 32, left:left + 32]
  if flip:
    win = win[:, ::-1]
  return (win / 255.0 - np.asarray(mean)) / np.asarray(std)


def test_augment_cifar_crop_flip_against_numpy():
  info = data.dataset_info('cifar10')
  n = 2000
  images = _coded_images(n, np.random.default_rng(11))
  fn = jax.jit(lambda x, k: data.augment_and_normalize(x, k, info,
                                                       train=True))
  out = np.asarray(fn(jnp.asarray(images), jax.random.key(0)))
  assert out.shape == (n, 32, 32, 3) and out.dtype == np.float32
  mean, std = np.asarray(info.mean), np.asarray(info.std)
  raw = np.round((out * std + mean) * 255).astype(int)
  # Output pixel (16, 16) always comes from inside the original image.
  flips = raw[:, 16, 17, 1] < raw[:, 16, 15, 1]
  src_row = raw[:, 16, 16, 0] - 10
  src_col = raw[:, 16, 16, 1] - 10
  tops = src_row - 16 + 4
  lefts = np.where(flips, src_col - 15, src_col - 16) + 4
  assert set(tops) == set(range(9)) and set(lefts) == set(range(9))
  assert abs(flips.mean() - 0.5) < 0.05  # 4.5 sigma at n = 2000
  # Offsets roughly uniform over 0..8.
  assert np.bincount(tops, minlength=9).min() > n / 9 * 0.6
  for i in range(0, n, 7):
    ref = _np_reference(images[i], tops[i], lefts[i], flips[i], mean, std)
    np.testing.assert_allclose(out[i], ref, rtol=0, atol=1e-5)
  # Padded pixels are -mean/std (zero pixel value before normalisation).
  i = int(np.flatnonzero(tops == 0)[0])
  np.testing.assert_allclose(out[i, 0], np.broadcast_to(-mean / std,
                                                        (32, 3)), atol=1e-6)
  # Deterministic for a key, different for another.
  np.testing.assert_array_equal(
      out, np.asarray(fn(jnp.asarray(images), jax.random.key(0))))
  other = np.asarray(fn(jnp.asarray(images), jax.random.key(1)))
  assert np.mean(np.any(other != out, axis=(1, 2, 3))) > 0.8


def test_augment_eval_and_non_cifar_only_normalise():
  rng = np.random.default_rng(12)
  info = data.dataset_info('cifar100')
  x = _rand_images(rng, 5, 32, 32, 3)
  out = data.augment_and_normalize(jnp.asarray(x), jax.random.key(3), info,
                                   train=False)
  ref = (x / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  assert out.dtype == jnp.float32
  for name, shape in (('mnist', (28, 28, 1)), ('digits', (8, 8, 1))):
    info = data.dataset_info(name)
    x = _rand_images(rng, 3, *shape)
    out = data.augment_and_normalize(jnp.asarray(x), jax.random.key(3),
                                     info, train=True)
    ref = (x / 255.0 - info.mean[0]) / info.std[0]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_augment_bad_inputs():
  info = data.dataset_info('cifar10')
  with pytest.raises(ValueError, match=r'\(4, 28, 28, 1\).*\[B, 32, 32, 3\]'):
    data.augment_and_normalize(jnp.zeros((4, 28, 28, 1), jnp.uint8),
                               jax.random.key(0), info, train=True)
  with pytest.raises(TypeError, match='uint8.*float32'):
    data.augment_and_normalize(jnp.ones((2, 32, 32, 3), jnp.float32),
                               jax.random.key(0), info, train=True)


# ---------------------------------------------------------------- streaming --

def _grey_folder(root: Path, counts=(7, 5, 9), seed=13):
  """28x28 grey PNGs (mnist-shaped: no augmentation), all distinct; returned
  grouped by class (not in listing order). Empty class folders make up
  MNIST's 10 classes."""
  rng = np.random.default_rng(seed)
  images = []
  for c, n in enumerate(counts):
    for i in range(n):
      arr = _rand_images(rng, 1, 28, 28, 1)[0]
      _save(arr, root / 'train' / f'class{c}' / f'{i:02d}.png')
      _save(arr, root / 'val' / f'class{c}' / f'{i:02d}.png')
      images.append(arr)
  for split in ('train', 'val'):
    _pad_classes(root / split, 10)
  return np.stack(images)


def _collect(it):
  out = [{k: np.array(v) for k, v in b.items()} for b in it]
  it.close()
  return out


def _record_ids(batch_images, originals, info):
  """Index of the original image each normalised output came from."""
  raw = np.round((batch_images * info.std[0] + info.mean[0]) * 255)
  flat = originals.reshape(len(originals), -1).astype(float)
  ids = []
  for img in raw.reshape(len(raw), -1):
    hits = np.flatnonzero(np.all(flat == img, axis=1))
    assert len(hits) == 1
    ids.append(int(hits[0]))
  return ids


def test_streaming_process_shards_union_is_global_batch(tmp_path):
  originals = _grey_folder(tmp_path)
  info = data.dataset_info('mnist')
  kw = dict(global_batch_size=6, seed=5, train=True, num_epochs=2,
            worker_count=0)
  single = _collect(data.streaming_iterator('mnist', tmp_path, 'train',
                                            **kw))
  shards = [_collect(data.streaming_iterator(
      'mnist', tmp_path, 'train', process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert len(single) == 2 * (21 // 6) == len(shards[0]) == len(shards[1])
  for step, whole in enumerate(single):
    assert whole['image'].shape == (6, 28, 28, 1)
    assert whole['image'].dtype == np.float32 and whole['label'].dtype == (
        np.int32)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][step][key], shards[1][step][key]]),
          whole[key])
    ids0 = _record_ids(shards[0][step]['image'], originals, info)
    ids1 = _record_ids(shards[1][step]['image'], originals, info)
    assert not set(ids0) & set(ids1)
  epochs = [sum((_record_ids(b['image'], originals, info)
                 for b in single[e * 3:(e + 1) * 3]), []) for e in range(2)]
  for ids in epochs:
    assert len(set(ids)) == 18  # no repeats within an epoch
  assert epochs[0] != epochs[1]  # reshuffled each epoch
  labels = np.repeat(np.arange(3), (7, 5, 9))
  np.testing.assert_array_equal(single[0]['label'],
                                labels[_record_ids(single[0]['image'],
                                                   originals, info)])


def test_streaming_resume_and_eval_padding(tmp_path):
  originals = _grey_folder(tmp_path)
  info = data.dataset_info('mnist')
  kw = dict(global_batch_size=4, seed=1, train=True, num_epochs=3,
            worker_count=0)
  full = _collect(data.streaming_iterator('mnist', tmp_path, 'train', **kw))
  resumed = _collect(data.streaming_iterator('mnist', tmp_path, 'train',
                                             start_step=7, **kw))
  assert len(full) == 15 and len(resumed) == 8
  for a, b in zip(full[7:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  other_seed = _collect(data.streaming_iterator(
      'mnist', tmp_path, 'train', **{**kw, 'seed': 2}))
  assert any(np.any(a['label'] != b['label'])
             for a, b in zip(full, other_seed))
  # Evaluation: every example once, in listing order (interleaved by
  # class), last batch padded.
  it = data.streaming_iterator('mnist', tmp_path, 'test', global_batch_size=8,
                               process_index=1, process_count=2, train=False,
                               worker_count=0)
  assert it.num_examples == 21 and it.steps_per_epoch == 3
  batches = _collect(it)
  ids = []
  for k, b in enumerate(batches):
    mask = b['mask']
    positions = k * 8 + 4 + np.arange(4)
    np.testing.assert_array_equal(mask, positions < 21)
    ids += _record_ids(b['image'][mask], originals, info)
  starts = np.cumsum([0, 7, 5])
  listing = [int(starts[c]) + r for c, r in _interleaved((7, 5, 9))]
  assert ids == [listing[i] for k in range(3)
                 for i in range(k * 8 + 4, k * 8 + 8) if i < 21]


def test_streaming_cifar_crop_flip_matches_torchvision():
  """The streamed pipeline's own (numpy) CIFAR augmentation: zero padding
  4, crop offsets uniform over 0..8, a horizontal flip with p = 1/2. Only
  the in-memory (JAX) augmentation was compared with torchvision."""
  img = _coded_images(1, np.random.default_rng(0))[0]
  tops, lefts, flips = [], [], []
  for s in range(600):
    out = streaming._pad_crop_flip(img, np.random.default_rng(s))
    raw = out.astype(int)
    flip = bool(raw[16, 17, 1] < raw[16, 15, 1])
    top = raw[16, 16, 0] - 10 - 16 + 4
    left = raw[16, 16, 1] - 10 - (15 if flip else 16) + 4
    ref = np.pad(img, ((4, 4), (4, 4), (0, 0)))[top:top + 32, left:left + 32]
    np.testing.assert_array_equal(out, ref[:, ::-1] if flip else ref)
    tops.append(top)
    lefts.append(left)
    flips.append(flip)
  assert set(tops) == set(lefts) == set(range(9))
  assert abs(np.mean(flips) - 0.5) < 0.1


def test_streaming_cifar_eval_is_not_augmented(tmp_path):
  """Streamed CIFAR evaluation is the plain normalised images in listing
  order, as the in-memory pipeline reads them: augmenting the evaluation
  batches too passed."""
  expected = _make_imagefolder(tmp_path, splits=('test',))
  info = data.dataset_info('cifar10')
  batches = _collect(data.streaming_iterator(
      'cifar10', tmp_path, 'test', global_batch_size=4, train=False,
      worker_count=0))
  got = np.concatenate([b['image'][b['mask']] for b in batches])
  want = ((expected['test'][0] / 255.0 - np.asarray(info.mean))
          / np.asarray(info.std))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_streaming_imagenet_transforms(tmp_path):
  rng = np.random.default_rng(14)
  sizes = [(300, 260), (250, 400), (180, 120)]
  for i, (h, w) in enumerate(sizes):
    _save(_rand_images(rng, 1, h, w, 3)[0], tmp_path / 'val' / f'n{i}' /
          'a.JPEG')
    _save(_rand_images(rng, 1, h, w, 3)[0], tmp_path / 'train' / f'n{i}' /
          'a.JPEG')
  Image.fromarray(_rand_images(rng, 1, 90, 70, 1)[0, ..., 0]).save(
      tmp_path / 'train' / 'n0' / 'grey.jpg')  # grey JPEGs exist in ImageNet
  for split in ('train', 'val'):
    _pad_classes(tmp_path / split, 1000)
  info = data.dataset_info('imagenet2012')
  b = _collect(data.streaming_iterator('imagenet2012', tmp_path, 'test',
                                       global_batch_size=3, train=False,
                                       worker_count=0))[0]
  assert b['image'].shape == (3, 224, 224, 3) and b['image'].dtype == (
      np.float32)
  # Independent reference: torchvision Resize(256) + CenterCrop(224) in PIL.
  with Image.open(tmp_path / 'val' / 'n1' / 'a.JPEG') as img:
    w, h = img.size
    ow, oh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.convert('RGB').resize((ow, oh), Image.BILINEAR)
    top, left = int(round((oh - 224) / 2)), int(round((ow - 224) / 2))
    ref = np.asarray(img.crop((left, top, left + 224, top + 224))) / 255.0
  ref = (ref - np.asarray(info.mean)) / np.asarray(info.std)
  np.testing.assert_allclose(b['image'][1], ref, atol=1e-5)
  np.testing.assert_array_equal(b['label'], [0, 1, 2])
  train = _collect(data.streaming_iterator(
      'imagenet2012', tmp_path, 'train', global_batch_size=2, train=True,
      num_epochs=3, worker_count=0))
  assert len(train) == 6
  assert all(t['image'].shape == (2, 224, 224, 3) for t in train)
  assert np.all(np.isfinite(np.stack([t['image'] for t in train])))


def test_streaming_imagenet_eval_centre_crop_of_every_image(tmp_path):
  """Resize(256) + CenterCrop(224) on every image, with torchvision's
  round() of the crop offsets: the test above compares one image, where
  round() and rounding down agree, so `(oh - 224) // 2` passed."""
  rng = np.random.default_rng(14)
  sizes = [(300, 260), (250, 402), (181, 120)]
  for i, (h, w) in enumerate(sizes):
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    (tmp_path / 'val' / f'n{i}').mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / 'val' / f'n{i}' / 'a.png')
  _pad_classes(tmp_path / 'val', 1000)
  info = data.dataset_info('imagenet2012')
  b = _collect(data.streaming_iterator('imagenet2012', tmp_path, 'test',
                                       global_batch_size=3, train=False,
                                       worker_count=0))[0]
  for i in range(3):
    with Image.open(tmp_path / 'val' / f'n{i}' / 'a.png') as img:
      w, h = img.size
      ow, oh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
      img = img.convert('RGB').resize((ow, oh), Image.BILINEAR)
      top, left = int(round((oh - 224) / 2)), int(round((ow - 224) / 2))
      ref = np.asarray(img.crop((left, top, left + 224, top + 224))) / 255.0
    ref = (ref - np.asarray(info.mean)) / np.asarray(info.std)
    np.testing.assert_allclose(b['image'][i], ref, atol=1e-5, err_msg=str(i))


def test_random_resized_crop_box_bounds():
  rng = np.random.default_rng(15)
  for _ in range(300):
    h, w = rng.integers(10, 500, 2)
    top, left, ch, cw = streaming.random_resized_crop_box(int(h), int(w), rng)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert ch > 0 and cw > 0
  # A very wide image falls back to the central crop of ratio 4/3 at most.
  assert streaming.random_resized_crop_box(
      10, 1000, np.random.default_rng(0)) == (0, 493, 10, 13)


def test_random_resized_crop_box_fallbacks_and_scale_range():
  """The tall-image fallback (a central crop of ratio 3/4) and the area
  range 0.08..1 of torchvision's RandomResizedCrop: only the bounds and
  the wide-image fallback were checked."""
  assert streaming.random_resized_crop_box(
      1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)
  rng = np.random.default_rng(1)
  fractions = []
  for _ in range(2000):
    _, _, h, w = streaming.random_resized_crop_box(400, 400, rng)
    fractions.append(h * w / 160000)
  assert min(fractions) < 0.1 and max(fractions) > 0.9
  assert 0.45 < np.median(fractions) < 0.6  # U(0.08, 1), some rejected


def test_streaming_bad_arguments(tmp_path):
  _grey_folder(tmp_path, counts=(2, 2, 2))
  with pytest.raises(ValueError, match='not divisible by process_count 4'):
    data.streaming_iterator('mnist', tmp_path, 'train', global_batch_size=6,
                            process_count=4, train=True)
  with pytest.raises(ValueError, match='ImageFolder'):
    data.streaming_iterator('imagenet2012', None, 'train',
                            global_batch_size=6, train=True)
  with pytest.raises(ValueError, match='exceeds the 6 training examples'):
    data.streaming_iterator('mnist', tmp_path, 'train', global_batch_size=8,
                            train=True)


@pytest.mark.slow
def test_streaming_grain_workers_match_in_process(tmp_path):
  _make_imagefolder(tmp_path, counts=(4, 3, 5), splits=('train',))
  kw = dict(global_batch_size=4, process_index=1, process_count=2, seed=3,
            train=True, num_epochs=2, start_step=1)
  ref = _collect(data.streaming_iterator('cifar10', tmp_path, 'train',
                                         worker_count=0, **kw))
  got = _collect(data.streaming_iterator('cifar10', tmp_path, 'train',
                                         worker_count=2, **kw))
  assert len(ref) == len(got) == 2 * (15 // 4) - 1
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_imagenet_train_crop_with_jpeg_draft_matches_full_decode(tmp_path):
  """Large JPEGs decode at reduced scale for training crops: the crop must
  still show the same region as a full-resolution decode."""
  rng = np.random.default_rng(16)
  small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  big = Image.fromarray(small).resize((1600, 1200), Image.BICUBIC)
  path = tmp_path / 'big.jpg'
  big.save(path, quality=95)
  diffs = []
  for seed in range(6):
    got = streaming._decode_large(str(path), 224, True,
                                  np.random.default_rng(seed))
    r = np.random.default_rng(seed)
    with Image.open(path) as img:
      img = img.convert('RGB')
      top, left, h, w = streaming.random_resized_crop_box(1200, 1600, r)
      ref = np.asarray(img.resize((224, 224), Image.BILINEAR,
                                  box=(left, top, left + w, top + h)))
      if r.random() < 0.5:
        ref = ref[:, ::-1]
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    diffs.append(np.abs(got.astype(float) - ref).mean())
  assert max(diffs) < 3.0, diffs  # same region and flip; filters differ


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
  """PIL converts a 16-bit grey PNG ('I;16') to 8 bits by clipping: every
  pixel above 255 (nearly all) became white. The loaders scale it instead;
  32-bit integer or float images, of unknown range, are refused."""
  from addernet_jax.sr import data as sr_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  wide = rng.integers(0, 65536, (37, 29), dtype=np.uint16)
  png = tmp_path / 'sixteen.png'
  Image.fromarray(wide).save(png)
  assert Image.open(png).mode.startswith('I;16')
  want = np.round(wide / 257.0).astype(np.uint8)
  got = local.decode_image(str(png), (37, 29, 1))[..., 0]
  np.testing.assert_array_equal(got, want)
  rgb = sr_data.load_rgb(png)
  assert rgb.shape == (37, 29, 3)
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel], want)
  big = tmp_path / 'big.png'
  Image.fromarray(np.tile(wide, (8, 8))).save(big)  # 296 x 232
  centre = streaming._decode_large(str(big), 224, False, None)
  assert 60 < centre.mean() < 195  # the clipped image was all 255
  tiff = tmp_path / 'float.tiff'
  Image.fromarray(wide.astype(np.float32)).save(tiff)
  for load in (lambda: local.decode_image(str(tiff), (37, 29, 1)),
               lambda: sr_data.load_rgb(tiff)):
    with pytest.raises(local.ImageDecodeError,
                       match=r"float\.tiff: a float image \(PIL mode 'F'\) "
                       r'has no known 0\.\.255 range'):
      load()


def test_imagefolder_reads_nested_folders_and_names_empty_classes(
    tmp_path, caplog):
  """Images in a sub-folder of a class were skipped and a class left with
  none trained on nothing, without a word; torchvision's ImageFolder
  reads nested folders."""
  expected = _make_imagefolder(tmp_path, splits=('train',), num_classes=3)
  cat = tmp_path / 'train' / 'cat'
  (cat / 'more').mkdir()
  for f in sorted(cat.glob('*.png')):
    f.rename(cat / 'more' / f.name)
  paths, labels, classes = local.list_imagefolder(tmp_path, 'train')
  assert classes == ['ant', 'cat', 'zebra']
  assert sorted(p for p in paths if '/cat/' in p) == sorted(
      str(cat / 'more' / f'{i:04d}.png') for i in range(3))
  np.testing.assert_array_equal(np.sort(labels),
                                np.sort(expected['train'][1]))
  # A class folder with no image: a warning naming it.
  for f in (cat / 'more').glob('*.png'):
    f.unlink()
  with caplog.at_level('WARNING'):
    _, labels, _ = local.list_imagefolder(tmp_path, 'train')
  assert 1 not in labels
  assert any("1 class folder(s) have no image files ('cat')" in r.getMessage()
             and 'train on no image' in r.getMessage()
             for r in caplog.records)
  # A dangling link named like an image is named, not skipped.
  (tmp_path / 'train' / 'ant' / 'gone.png').symlink_to(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match=r'gone\.png: not a readable file'):
    local.list_imagefolder(tmp_path, 'train')


def test_imagefolder_file_order_within_a_class_is_torchvisions(tmp_path):
  """Nested files come in torchvision's order (its make_dataset: sorted
  os.walk, then sorted file names): folder by folder, not sorted relative
  paths, which put 'sub-x/b' before 'sub/a' and 'z' after both."""
  cls = tmp_path / 'train' / 'cls'
  names = ['z.png', 'a.png', 'sub/b.png', 'sub/a.png', 'sub-x/a.png',
           'sub/deeper/a.png', 'sub0/c.png', 'Sub/a.png']
  for name in names:
    (cls / name).parent.mkdir(parents=True, exist_ok=True)
    (cls / name).write_bytes(b'')
  expected = [os.path.join(root, f)
              for root, _, files in sorted(os.walk(cls, followlinks=True))
              for f in sorted(files)]
  paths, labels, _ = local.list_imagefolder(tmp_path, 'train')
  assert paths == expected
  assert paths != sorted(paths)  # the case this test is for
  np.testing.assert_array_equal(labels, 0)


def test_a_missing_test_split_points_to_holdout_examples(tmp_path):
  """An ImageFolder or CIFAR pickles without a test split: the error named
  what was expected but not --config.holdout_examples, which trains
  without one (the MNIST error did)."""
  _make_imagefolder(tmp_path / 'folder', splits=('train',))
  with pytest.raises(ValueError, match=(
      r"has no test split: expected class folders under one of test/, val/, "
      r"validation/\. To train without the test split.*"
      r"--config\.holdout_examples=10000")):
    data.load_arrays('cifar10', tmp_path / 'folder', 'test')
  (tmp_path / 'pickles').mkdir()
  (tmp_path / 'pickles' / 'data_batch_1').write_bytes(b'')
  with pytest.raises(ValueError, match=r"test_batch expected\)\. To train "
                     r"without the test split"):
    data.load_arrays('cifar10', tmp_path / 'pickles', 'test')


def test_imagefolder_class_order_is_torchvisions(tmp_path):
  """Class indices follow the case-sensitive sorted folder names, as
  torchvision's ImageFolder (`sorted(os.scandir)`): "Banana" before
  "apple"; every file gets its folder's index."""
  names = ["Zebra", "apple", "Banana", "cat", "dog", "Eel", "fox", "goat",
           "Hen", "ibis"]
  for split in ("train", "test"):
    for i, name in enumerate(names):
      folder = tmp_path / split / name
      folder.mkdir(parents=True)
      Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(folder / "0.png")
  paths, labels, classes = local.list_imagefolder(
      tmp_path, "test", data.dataset_info("cifar10"))
  assert classes == sorted(names)
  assert [classes[label] for label in labels] == [
      Path(p).parent.name for p in paths]


def test_normalisation_constants_of_every_dataset():
  """The constants of the official training scripts and torchvision; the
  digits' own are their training split's mean and std."""
  want = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
          "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
          "mnist": ((0.1307,), (0.3081,)),
          "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
  for name, (mean, std) in want.items():
    info = data.dataset_info(name)
    assert (tuple(info.mean), tuple(info.std)) == (mean, std), name
  images, _ = local.load_digits("train")
  images = images.astype(np.float64) / 255
  info = data.dataset_info("digits")
  assert abs(images.mean() - info.mean[0]) < 5e-5
  assert abs(images.std() - info.std[0]) < 5e-5


# Gaps found by a mutation audit of the data modules (check_arrays, MNIST
# IDX files, ImageFolder decoding, TFDS arguments, the in-memory cache).


def _rand_uint8(rng, *shape):
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _fake_tfds(monkeypatch, images, labels):
  """A stand-in tensorflow_datasets module recording tfds.load's calls."""
  calls = []
  fake = types.ModuleType('tensorflow_datasets')

  def load(name, **kwargs):
    calls.append((name, kwargs))
    return images, labels

  fake.load = load
  fake.as_numpy = lambda t: t
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake)
  return calls


def _prepare_tfds(root: Path, name: str, *parts: str) -> Path:
  version = root.joinpath(name, *parts)
  version.mkdir(parents=True)
  (version / 'dataset_info.json').write_text('{}')
  return version


# ------------------------------------------------------------ check_arrays --

def test_check_arrays_refuses_negative_labels_empty_splits_and_counts():
  """check_arrays is the only check of what TFDS returns:
  negative labels, an empty split, a label count that differs from the
  image count and the wrong channel count must be refused (mutants:
  `labels.min() < 0` dropped, the empty-split check dropped, the
  label-count check dropped, only H and W compared)."""
  rng = np.random.default_rng(20)
  info = data.dataset_info('cifar10')
  x = _rand_uint8(rng, 5, 32, 32, 3)
  ok_x, ok_y = local.check_arrays(x, np.array([0, 9, 3, 3, 7]), info, 'src')
  np.testing.assert_array_equal(ok_x, x)
  assert ok_y.dtype == np.int32
  with pytest.raises(ValueError, match=r'src: labels range from -1 to 9, '
                     r'outside 0\.\.9 for cifar10'):
    local.check_arrays(x, np.array([0, 9, -1, 3, 7]), info, 'src')
  with pytest.raises(ValueError, match=r'src: 5 images but labels of shape '
                     r'\(4,\)'):
    local.check_arrays(x, np.array([0, 9, 3, 7]), info, 'src')
  with pytest.raises(ValueError, match=r'src: 5 images but labels of shape '
                     r'\(6,\)'):
    local.check_arrays(x, np.array([0, 9, 3, 7, 1, 2]), info, 'src')
  with pytest.raises(ValueError, match='src: no images found'):
    local.check_arrays(x[:0], np.array([], np.int64), info, 'src')
  # Grey images for an RGB dataset (a TFDS copy of another dataset).
  with pytest.raises(ValueError, match=r'src: images have shape '
                     r'\(5, 32, 32, 1\), expected \[N, 32, 32, 3\]'):
    local.check_arrays(x[..., :1], np.array([0, 9, 3, 3, 7]), info, 'src')


def test_tfds_arrays_with_mismatched_labels_are_refused(monkeypatch,
                                                        tmp_path):
  """The same through load_arrays on a prepared TFDS
  data_dir: more labels than images is an error naming the source."""
  _prepare_tfds(tmp_path, 'mnist', '3.0.1')
  rng = np.random.default_rng(21)
  _fake_tfds(monkeypatch, _rand_uint8(rng, 3, 28, 28, 1),
             rng.integers(0, 10, 4))
  with pytest.raises(ValueError, match=r'mnist test \(tfds layout in .*\): '
                     r'3 images but labels of shape \(4,\)'):
    data.load_arrays('mnist', tmp_path, 'test')


# ------------------------------------------------------------------- MNIST --

def test_mnist_idx_with_trailing_bytes_or_wrong_rank_is_refused(tmp_path):
  """A file with more data
  than its header says (two files concatenated) and an images file passed
  as a labels file are refused naming the file (mutants: the size check
  made `<`, the rank check dropped)."""
  rng = np.random.default_rng(22)
  x = _rand_uint8(rng, 3, 28, 28)
  y = rng.integers(0, 10, 3).astype(np.uint8)
  labels = tmp_path / 't10k-labels-idx1-ubyte'
  images = tmp_path / 't10k-images-idx3-ubyte'
  images.write_bytes(_idx_bytes(x) + b'\x07' * 5)
  labels.write_bytes(_idx_bytes(y))
  with pytest.raises(ValueError, match=(
      r"cannot read MNIST file '.*t10k-images-idx3-ubyte': header says "
      r'shape \(3, 28, 28\) \(2352 bytes\) but the file has 2357 bytes')):
    data.load_arrays('mnist', tmp_path, 'test')
  images.write_bytes(_idx_bytes(x))
  got, got_y = data.load_arrays('mnist', tmp_path, 'test')
  np.testing.assert_array_equal(got[..., 0], x)
  assert got.flags.writeable  # as every other loader's (it was a view)
  np.testing.assert_array_equal(got_y, y)
  # An IDX3 file under the labels name (the 3 bytes of dims 2 and 3 and
  # the pixels would otherwise be read as labels).
  labels.write_bytes(_idx_bytes(_rand_uint8(rng, 3, 1, 1)))
  with pytest.raises(ValueError, match=(
      r"cannot read MNIST file '.*t10k-labels-idx1-ubyte': not an "
      r'unsigned-byte IDX file with 1 dimensions \(magic 00000803, '
      r'expected 00000801\)')):
    data.load_arrays('mnist', tmp_path, 'test')


# ------------------------------------------------------------- ImageFolder --

def test_imagefolder_test_class_unknown_to_train_is_refused(tmp_path):
  """A class folder of test/ that train/ lacks has no class index: it must be
  named, not crash with a KeyError or be given a wrong index (mutant: the
  `not in index` check dropped)."""
  rng = np.random.default_rng(23)
  for c in range(10):
    _save(_rand_uint8(rng, 32, 32, 3), tmp_path / 'train' / f'c{c}' / '0.png')
  for c in (1, 4):
    _save(_rand_uint8(rng, 32, 32, 3), tmp_path / 'test' / f'c{c}' / '0.png')
  _save(_rand_uint8(rng, 32, 32, 3), tmp_path / 'test' / 'stray' / '0.png')
  with pytest.raises(ValueError, match=(
      r"stray: class folder 'stray' is not among the 10 classes of "
      r'.*train')):
    data.load_arrays('cifar10', tmp_path, 'test')


def test_palette_and_cmyk_images_decode_to_rgb(tmp_path):
  """Palette PNGs and
  CMYK TIFFs are converted to RGB, not read as raw palette indices or
  4-channel arrays (mutant: the convert('RGB') dropped)."""
  rng = np.random.default_rng(24)
  rgb = _rand_uint8(rng, 13, 7, 3)
  pal = Image.fromarray(rgb).quantize(colors=17)
  assert pal.mode == 'P'
  pal.save(tmp_path / 'p.png')
  want = np.asarray(pal.convert('RGB'))
  got = local.decode_image(str(tmp_path / 'p.png'), (13, 7, 3))
  assert got.dtype == np.uint8 and got.shape == (13, 7, 3)
  np.testing.assert_array_equal(got, want)
  cmyk = Image.fromarray(rgb).convert('CMYK')
  cmyk.save(tmp_path / 'c.tiff')
  got = local.decode_image(str(tmp_path / 'c.tiff'), (13, 7, 3))
  np.testing.assert_array_equal(got, np.asarray(cmyk.convert('RGB')))


def test_bilevel_image_decodes_to_0_and_255(tmp_path):
  """A 1-bit
  (PIL mode '1') PNG is converted to 8-bit grey, 0 and 255, not read as
  0 and 1 (mutant: the convert('L') skipped for mode '1')."""
  bits = np.random.default_rng(30).random((11, 6)) < 0.5
  Image.fromarray(bits).save(tmp_path / 'b.png')
  assert Image.open(tmp_path / 'b.png').mode == '1'
  got = local.decode_image(str(tmp_path / 'b.png'), (11, 6, 1))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got[..., 0], np.where(bits, 255, 0))


def test_thirty_two_bit_integer_image_is_refused(tmp_path):
  """A 32-bit integer image (PIL mode 'I') has no known 0..255 range: it is
  refused naming the file, not clipped to 0/255 by convert('L') (mutant:
  only mode 'F' refused)."""
  wide = np.random.default_rng(31).integers(0, 70000, (9, 14),
                                            dtype=np.int32)
  Image.fromarray(wide).save(tmp_path / 'int.tiff')
  assert Image.open(tmp_path / 'int.tiff').mode == 'I'
  with pytest.raises(local.ImageDecodeError, match=(
      r"int\.tiff: a 32-bit integer image \(PIL mode 'I'\) has no known "
      r'0\.\.255 range')):
    local.decode_image(str(tmp_path / 'int.tiff'), (9, 14, 1))


# --------------------------------------------------------------- load_arrays --

def test_eval_only_without_holdout_does_not_load_train(tmp_path,
                                                       monkeypatch):
  """with_train=False
  returns None for training and never reads the training split, also
  without holdout_examples (mutant: `if with_train:` ignored there; the
  existing check covers only the holdout branch)."""
  rng = np.random.default_rng(26)
  x = _rand_uint8(rng, 4, 28, 28)
  y = rng.integers(0, 10, 4).astype(np.uint8)
  (tmp_path / 't10k-images-idx3-ubyte').write_bytes(_idx_bytes(x))
  (tmp_path / 't10k-labels-idx1-ubyte').write_bytes(_idx_bytes(y))
  train, (xe, ye) = data.load_in_memory_splits('mnist', tmp_path,
                                               with_train=False,
                                               eval_max_examples=3)
  assert train is None
  np.testing.assert_array_equal(xe[..., 0], x[:3])
  np.testing.assert_array_equal(ye, y[:3])


def test_empty_data_dir_string_means_tfds(monkeypatch, tmp_path, caplog):
  """data_dir ''
  (`--config.data_dir=`) means TFDS in its default data_dir, as None does,
  not the current directory; for the bundled digits it is no data_dir, so
  no warning (mutants: the `== ''` tests dropped)."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  _prepare_tfds(tmp_path / 'tfds', 'cifar10', '3.0.2')
  rng = np.random.default_rng(27)
  x, y = _rand_uint8(rng, 3, 32, 32, 3), np.array([4, 0, 9])
  calls = _fake_tfds(monkeypatch, x, y)
  monkeypatch.chdir(tmp_path)  # holds tfds/: no known layout
  gx, gy = data.load_arrays('cifar10', '', 'train')
  np.testing.assert_array_equal(gx, x)
  np.testing.assert_array_equal(gy, y)
  assert calls[0][1]['data_dir'] == str(tmp_path / 'tfds')
  with caplog.at_level(logging.WARNING, logger='addernet_jax.data.arrays'):
    data.load_arrays('digits', '', 'test')
  assert 'is not read' not in caplog.text


def test_cache_entry_of_another_dtype_or_shape_is_rebuilt(
    tmp_path, monkeypatch, caplog):
  """A cache entry of the right labels but not uint8 or of another
  image shape (written by other code) is decoded again, not returned
  (mutants: the dtype check dropped, only the image count checked)."""
  rng = np.random.default_rng(28)
  for c in range(10):
    _save(_rand_uint8(rng, 32, 32, 3), tmp_path / 'd' / 'test' / f'c{c}' /
              '0.png')
  monkeypatch.setenv(arrays.CACHE_ENV, str(tmp_path / 'cache'))
  x, y = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  [entry] = (tmp_path / 'cache').glob('*.npz')
  np.savez(entry, images=x.astype(np.int16) + 300, labels=y)
  with caplog.at_level(logging.WARNING):
    x2, y2 = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  assert x2.dtype == np.uint8
  np.testing.assert_array_equal(x2, x)
  np.testing.assert_array_equal(y2, y)
  assert 'damaged' in caplog.text
  # Of the right labels but another image size: rebuilt too, never fatal.
  np.savez(entry, images=x[:, :31, :, :], labels=y)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    x3, _ = data.load_arrays('cifar10', tmp_path / 'd', 'test')
  np.testing.assert_array_equal(x3, x)
  assert 'damaged' in caplog.text


# -------------------------------------------------------------------- TFDS --

def test_tfds_prepared_dir_layouts(tmp_path):
  """A prepared
  dataset is found as <name>/<version>/ and <name>/<config>/<version>/;
  a name TFDS does not serve, or nothing prepared, is None (mutant: the
  config/version glob dropped)."""
  assert tfds_source.prepared_dir('cifar10', tmp_path) is None
  (tmp_path / 'cifar10' / '3.0.2').mkdir(parents=True)  # no info file
  assert tfds_source.prepared_dir('cifar10', tmp_path) is None
  version = _prepare_tfds(tmp_path, 'mnist', 'plain', '3.0.1')
  assert tfds_source.prepared_dir('mnist', tmp_path) == version
  assert local.detect_layout(tmp_path, 'mnist') == 'tfds'
  _prepare_tfds(tmp_path, 'digits', '1.0.0')
  assert tfds_source.prepared_dir('digits', tmp_path) is None


def test_load_tfds_arrays_arguments(monkeypatch, tmp_path):
  """What TFDS is
  asked for: the whole split as (image, label) pairs, ImageNet's test
  split being 'validation'; an explicit data_dir without the prepared
  dataset is a ValueError (no download, no network probe); a dataset TFDS
  does not serve is refused (mutants: as_supervised, the ImageNet split,
  the `data_dir is not None` and `not in TFDS_NAMES` checks)."""
  rng = np.random.default_rng(29)
  x, y = _rand_uint8(rng, 2, 8, 8, 3), np.array([3, 1])
  calls = _fake_tfds(monkeypatch, x, y)
  info = data.dataset_info('imagenet2012')
  _prepare_tfds(tmp_path, 'imagenet2012', '5.1.0')
  gx, gy = tfds_source.load_tfds_arrays('imagenet2012', str(tmp_path),
                                        'test', info)
  np.testing.assert_array_equal(gx, x)
  np.testing.assert_array_equal(gy, y)
  name, kw = calls[-1]
  assert name == 'imagenet2012' and kw['split'] == 'validation'
  assert kw['as_supervised'] is True and kw['batch_size'] == -1
  assert kw['data_dir'] == str(tmp_path)
  tfds_source.load_tfds_arrays('imagenet2012', str(tmp_path), 'train', info)
  assert calls[-1][1]['split'] == 'train'

  def no_probe(*args, **kwargs):
    raise AssertionError('probed the network for an explicit data_dir')

  monkeypatch.setattr(tfds_source, 'network_available', no_probe)
  n = len(calls)
  with pytest.raises(ValueError, match=r"cifar100 is not prepared in the "
                     r"TFDS data_dir '.*empty'"):
    tfds_source.load_tfds_arrays('cifar100', str(tmp_path / 'empty'), 'test',
                                 data.dataset_info('cifar100'))
  with pytest.raises(ValueError, match=r"'digits' is not available from "
                     r'TensorFlow Datasets'):
    tfds_source.load_tfds_arrays('digits', str(tmp_path), 'test',
                                 data.dataset_info('digits'))
  assert len(calls) == n


# -------------------------------------------------------------------- info --

def test_dataset_info_edge_cases():
  """An unhashable name is
  the same ValueError as an unknown one; cifar_augment needs 32x32 with
  three channels (a 32x32 grey dataset is not cropped/flipped as CIFAR);
  the ImageNet sizes (mutants: `except KeyError` only, cifar_augment on
  H and W only, ImageNet test_size)."""
  with pytest.raises(ValueError, match="Unknown dataset \\['cifar10'\\]"):
    data.dataset_info(['cifar10'])
  with pytest.raises(ValueError, match='Unknown dataset None'):
    data.dataset_info(None)
  grey32 = info_lib.DatasetInfo(
      name='grey32', num_classes=3, image_shape=(32, 32, 1), mean=(0.5,),
      std=(0.25,), train_size=None, test_size=None, in_memory=True)
  assert not grey32.cifar_augment
  assert [n for n in data.DATASET_NAMES
          if data.dataset_info(n).cifar_augment] == ['cifar10', 'cifar100']
  imagenet = data.dataset_info('imagenet2012')
  assert (imagenet.train_size, imagenet.test_size) == (1_281_167, 50_000)
  assert imagenet.num_classes == 1000
