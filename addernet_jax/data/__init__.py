"""Datasets: in-memory arrays (MNIST, CIFAR, digits) augmented on device, and
a Grain streaming pipeline for datasets that do not fit in memory (ImageNet).

    info = dataset_info('cifar10')
    images, labels = load_arrays('cifar10', data_dir, 'train')   # uint8 NHWC
    x = augment_and_normalize(images[idx], rng, info, train=True)  # in jit
    it = streaming_iterator('imagenet2012', data_dir, 'train', ...)

`augment_and_normalize` (the only part that needs JAX) is imported on first
use, so that image-decoding worker processes start without importing JAX.
"""

from addernet_jax.data.arrays import load_arrays
from addernet_jax.data.arrays import load_in_memory_splits
from addernet_jax.data.info import DATASET_NAMES
from addernet_jax.data.info import DatasetInfo
from addernet_jax.data.info import dataset_info
from addernet_jax.data.local import LAYOUTS_HELP
from addernet_jax.data.streaming import DataWorkerError
from addernet_jax.data.streaming import StreamingIterator
from addernet_jax.data.streaming import streaming_iterator
from addernet_jax.data.tfds_source import DataUnavailableError

__all__ = [
    'DATASET_NAMES', 'DataUnavailableError', 'DataWorkerError',
    'DatasetInfo', 'LAYOUTS_HELP',
    'StreamingIterator',
    'augment_and_normalize', 'dataset_info', 'load_arrays',
    'load_in_memory_splits',
    'streaming_iterator',
]


def __getattr__(name):
  if name == 'augment_and_normalize':
    from addernet_jax.data import augment  # pylint: disable=g-import-not-at-top
    return augment.augment_and_normalize
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + ['augment_and_normalize'])
