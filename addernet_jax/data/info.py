"""Static description of the datasets the project trains on."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the input pipeline need to know about a dataset.

  Attributes:
    name: 'cifar10', 'cifar100', 'mnist', 'imagenet2012' or 'digits'.
    num_classes: number of labels (labels are 0..num_classes-1).
    image_shape: (H, W, C) of the model input.
    mean: per-channel normalisation mean on the 0..1 scale.
    std: per-channel normalisation standard deviation on the 0..1 scale.
    train_size: number of training examples of the standard split (None if
      it depends on the files).
    test_size: number of test (ImageNet: validation) examples.
    in_memory: True when a whole split fits in device memory, so it is loaded
      with `load_arrays` and augmented inside the jitted step; False for
      datasets read with `streaming_iterator`.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_size: int | None
  test_size: int | None
  in_memory: bool

  @property
  def cifar_augment(self) -> bool:
    """True for 32x32 RGB datasets (random crop with 4-pixel padding, flip)."""
    return tuple(self.image_shape) == (32, 32, 3)


_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # official AdderNet / pytorch-cifar
_CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_INFOS = {
    'cifar10': DatasetInfo(
        name='cifar10', num_classes=10, image_shape=(32, 32, 3),
        mean=_CIFAR10_MEAN, std=_CIFAR10_STD,
        train_size=50_000, test_size=10_000, in_memory=True),
    # The usual CIFAR-100 statistics (the official AdderNet release only
    # ships the CIFAR-10 pipeline).
    'cifar100': DatasetInfo(
        name='cifar100', num_classes=100, image_shape=(32, 32, 3),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        train_size=50_000, test_size=10_000, in_memory=True),
    'mnist': DatasetInfo(
        name='mnist', num_classes=10, image_shape=(28, 28, 1),
        mean=(0.1307,), std=(0.3081,),
        train_size=60_000, test_size=10_000, in_memory=True),
    'imagenet2012': DatasetInfo(
        name='imagenet2012', num_classes=1000, image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        train_size=1_281_167, test_size=50_000, in_memory=False),
    # scikit-learn's bundled 8x8 digits; mean/std of its training split
    # (see addernet_jax.data.local.load_digits).
    'digits': DatasetInfo(
        name='digits', num_classes=10, image_shape=(8, 8, 1),
        mean=(0.3056,), std=(0.3764,),
        train_size=1438, test_size=359, in_memory=True),
}

DATASET_NAMES = tuple(_INFOS)


def dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`; ValueError for unknown names."""
  try:
    return _INFOS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'Unknown dataset {name!r}; accepted names: '
        f'{", ".join(DATASET_NAMES)}.') from None
