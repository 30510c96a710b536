"""Datasets: in-memory arrays (MNIST, CIFAR, digits) augmented on device, and
a Grain streaming pipeline for datasets that do not fit in memory (ImageNet).

    info = dataset_info('cifar10')
    images, labels = load_arrays('cifar10', data_dir, 'train')   # uint8 NHWC
    x = augment_and_normalize(images[idx], rng, info, train=True)  # in jit
    it = streaming_iterator('imagenet2012', data_dir, 'train', ...)
"""

from addernet_jax.data.arrays import load_arrays
from addernet_jax.data.augment import augment_and_normalize
from addernet_jax.data.info import DATASET_NAMES
from addernet_jax.data.info import DatasetInfo
from addernet_jax.data.info import dataset_info
from addernet_jax.data.local import LAYOUTS_HELP
from addernet_jax.data.streaming import StreamingIterator
from addernet_jax.data.streaming import streaming_iterator

__all__ = [
    'DATASET_NAMES', 'DatasetInfo', 'LAYOUTS_HELP', 'StreamingIterator',
    'augment_and_normalize', 'dataset_info', 'load_arrays',
    'streaming_iterator',
]
