"""TensorFlow Datasets access: imported lazily, failing fast when offline.

TFDS is not a dependency of this project. Without a prepared dataset, TFDS
downloads it; offline that retries for minutes, so a prepared copy is looked
for first and, without one, the network is probed for a few seconds.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np

from addernet_jax.data import info as info_lib

TFDS_NAMES = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'mnist': 'mnist',
              'imagenet2012': 'imagenet2012'}
TFDS_SPLITS = {'train': 'train', 'test': 'test'}
TFDS_SPLITS_IMAGENET = {'train': 'train', 'test': 'validation'}

INSTALL_HELP = ('pip install -e ".[tfds]" in the checkout, or pip install '
                'tensorflow-datasets importlib_resources tensorflow-cpu  (TFDS '
                'needs importlib_resources for any download and TensorFlow to '
                'prepare and read image datasets)')



class DataUnavailableError(RuntimeError):
  """The dataset cannot come from TFDS here (TFDS not installed, not
  prepared and no network, or a manual download); the message says how to
  point config.data_dir at local files."""


# Host TFDS downloads its metadata from; probed before a download.
_PROBE_HOST = ('storage.googleapis.com', 443)
PROBE_TIMEOUT_S = 4.0


def local_help(name: str) -> str:
  from addernet_jax.data import local  # pylint: disable=g-import-not-at-top
  return (f'Point the data at local files instead: --config.data_dir=DIR '
          f'(config.data_dir) with DIR holding {name} in one of these '
          f'layouts.\n{local.LAYOUTS_HELP}')


def default_data_dir() -> Path:
  return Path(os.environ.get('TFDS_DATA_DIR',
                             '~/tensorflow_datasets')).expanduser()


def prepared_dir(name: str, data_dir: str | os.PathLike[str] | None
                 ) -> Path | None:
  """The version folder of a prepared TFDS dataset under data_dir, or None."""
  tfds_name = TFDS_NAMES.get(name)
  if tfds_name is None:
    return None
  root = Path(data_dir).expanduser() if data_dir else default_data_dir()
  base = root / tfds_name
  if not base.is_dir():
    return None
  # <name>/<version>/ or <name>/<config>/<version>/
  hits = sorted(base.glob('*/dataset_info.json')) + sorted(
      base.glob('*/*/dataset_info.json'))
  return hits[-1].parent if hits else None


def network_available(timeout: float = PROBE_TIMEOUT_S) -> bool:
  """True if TFDS's download host completes a TLS handshake in time.

  A TLS handshake, not just a TCP connect: sandboxes and proxies may accept
  any TCP connection. The probe runs in a daemon thread so that a hanging
  resolver cannot stall the caller for longer than `timeout` seconds.
  """
  import ssl  # pylint: disable=g-import-not-at-top
  result = []

  def probe():
    try:
      ctx = ssl.create_default_context()
      with socket.create_connection(_PROBE_HOST, timeout=timeout) as sock:
        with ctx.wrap_socket(sock, server_hostname=_PROBE_HOST[0]):
          result.append(True)
    except (OSError, ValueError):
      result.append(False)

  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(timeout)
  return bool(result and result[0])


def import_tfds(name: str):
  """Imports tensorflow_datasets or raises DataUnavailableError saying what
  to do."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataUnavailableError(
        f'config.data_dir is unset, so {name} would come from TensorFlow '
        f'Datasets, which is not installed ({e}). Install it with\n  '
        f'{INSTALL_HELP}.\nOr: {local_help(name)}') from None
  return tfds


def _check_available(name: str, data_dir: str | None) -> Path:
  """Returns the TFDS data_dir to use; fails fast if nothing can be read."""
  root = Path(data_dir).expanduser() if data_dir else default_data_dir()
  if prepared_dir(name, root) is not None:
    return root
  if data_dir is not None:
    raise ValueError(f'{TFDS_NAMES[name]} is not prepared in the TFDS data_dir'
                     f' {str(root)!r}. {local_help(name)}')
  if name == 'imagenet2012':
    raise DataUnavailableError(
        'imagenet2012 cannot be downloaded by TFDS (manual download: see '
        'https://www.tensorflow.org/datasets/catalog/imagenet2012). Prepare '
        'it as an ImageFolder (train/ and val/ class folders, as for '
        'pytorch/examples) and set config.data_dir to it.')
  if not network_available():
    raise DataUnavailableError(
        f'config.data_dir is unset and {name} is not prepared in the TFDS '
        f'data_dir {str(root)!r}, and the network is unreachable (no TLS '
        f'answer from {_PROBE_HOST[0]} within {PROBE_TIMEOUT_S:.0f} s), so TFDS '
        f'cannot download it. {local_help(name)}')
  return root


def load_tfds_arrays(name: str, data_dir: str | None, split: str,
                     info: info_lib.DatasetInfo
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Whole split through TFDS: (uint8 images, labels)."""
  if name not in TFDS_NAMES:
    raise ValueError(f'{name!r} is not available from TensorFlow Datasets; '
                     f'it needs no data_dir or a local one.')
  tfds = import_tfds(name)
  root = _check_available(name, data_dir)
  splits = TFDS_SPLITS_IMAGENET if name == 'imagenet2012' else TFDS_SPLITS
  ds = tfds.load(TFDS_NAMES[name], split=splits[split], data_dir=str(root),
                 batch_size=-1, as_supervised=True, download=True)
  images, labels = tfds.as_numpy(ds)
  del info
  return np.asarray(images), np.asarray(labels)
