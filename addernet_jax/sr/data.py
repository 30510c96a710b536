"""Super-resolution data: folders of HR images, bicubic LR, aligned patches.

A data folder is any directory of high-resolution images (PNG, JPEG or BMP;
the DIV2K layout `DIV2K_train_HR/0001.png ...`, or a benchmark such as Set5);
sub-folders are not searched. Every image is read as 8-bit RGB, cropped to a
multiple of the scale (bottom/right rows and columns dropped, MATLAB's
`modcrop`) and its low-resolution twin is made once, at load time, in memory:

    LR = PIL.Image.resize(HR, (w / scale, h / scale), Image.BICUBIC)

on the 8-bit image (PIL's bicubic: Keys' cubic with a = -0.5, the kernel
widened by the scale when shrinking, i.e. antialiased, as MATLAB's
`imresize`). It differs from MATLAB's `imresize` (which the published LR
benchmark files come from) at the borders (PIL renormalises the truncated
kernel, MATLAB pads symmetrically) and by rounding (PIL's fixed-point
arithmetic): a few hundredths of a dB of bicubic PSNR, not comparable
digit-for-digit with papers that use MATLAB-made LR files.

Training batches (`sample_batch`) are random LR patches of `patch_size` and
their HR patches (`patch_size * scale`, at exactly `scale` times the LR
offset), each pair flipped horizontally, vertically and transposed (the 8
dihedral transforms) together. Everything is drawn from a NumPy generator
seeded with (seed, step): the batch of a step does not depend on resuming or
on the number of devices.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from addernet_jax.data import local
from addernet_jax.sr import metrics

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
  """The image files of `folder` (not recursive), sorted by name.

  Raises:
    FileNotFoundError: the folder does not exist.
    NotADirectoryError: it is a file.
    ValueError: it holds no PNG/JPEG/BMP file.
  """
  path = Path(folder).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"super-resolution data folder {str(path)!r} "
                            "does not exist")
  if not path.is_dir():
    raise NotADirectoryError(f"super-resolution data folder {str(path)!r} is "
                             "not a directory")
  files = sorted(p for p in path.iterdir()
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise ValueError(f"super-resolution data folder {str(path)!r} holds no "
                     f"image ({', '.join(IMAGE_EXTENSIONS)}); it should "
                     "contain high-resolution images directly, e.g. "
                     "DIV2K_train_HR/0001.png")
  return files


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
  """An image file as uint8 RGB (h, w, 3) (16-bit grey scaled to 8 bits);
  ValueError naming the file if it cannot be decoded."""
  try:
    with Image.open(path) as im:
      return np.asarray(local.to_8_bit(im, str(path)).convert("RGB"),
                        np.uint8)
  except local.ImageDecodeError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read image {str(path)!r}: {e}") from e


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
  """Crops the bottom rows and right columns so that both sides divide by
  `scale`."""
  h, w = image.shape[:2]
  return image[:h - h % scale, :w - w % scale]


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
  """The LR image of an 8-bit RGB HR image whose sides divide by `scale`:
  PIL bicubic (antialiased), 8-bit output."""
  h, w = hr.shape[:2]
  if h % scale or w % scale:
    raise ValueError(f"HR size {h}x{w} does not divide by scale {scale} "
                     "(modcrop it first)")
  im = Image.fromarray(np.ascontiguousarray(hr), "RGB")
  return np.asarray(im.resize((w // scale, h // scale), Image.BICUBIC),
                    np.uint8)


def to_model_input(image: np.ndarray, colors: int) -> np.ndarray:
  """uint8 RGB (..., 3) -> float32 in [0, 1] with `colors` channels: RGB / 255
  (colors=3) or the BT.601 Y channel / 255 (colors=1, in [16/255, 235/255])."""
  if colors == 3:
    return np.asarray(image, np.float32) / 255.0
  if colors == 1:
    return (metrics.rgb_to_y(image) / 255.0).astype(np.float32)[..., None]
  raise ValueError(f"colors must be 1 or 3, got {colors!r}")


class ImageFolderSR:
  """The HR images of a folder and their bicubic LR twins, in memory.

  Attributes:
    paths: the image files, sorted.
    hr: uint8 RGB HR images, cropped to a multiple of `scale`.
    lr: uint8 RGB LR images (`bicubic_downscale`).
    scale: the upscaling factor.
  """

  def __init__(self, folder: str | os.PathLike[str], scale: int, *,
               max_images: int = -1, min_lr_size: int = 1):
    if scale not in (2, 3, 4):
      raise ValueError(f"scale must be 2, 3 or 4, got {scale!r}")
    self.scale = scale
    self.paths = list_images(folder)
    if max_images is not None and max_images > 0:
      self.paths = self.paths[:max_images]
    self.hr, self.lr = [], []
    for path in self.paths:
      hr = modcrop(load_rgb(path), scale)
      lr_h, lr_w = hr.shape[0] // scale, hr.shape[1] // scale
      if min(lr_h, lr_w) < min_lr_size:
        raise ValueError(
            f"image {str(path)!r} ({hr.shape[0]}x{hr.shape[1]}) is too small:"
            f" its x{scale} LR image is {lr_h}x{lr_w}, smaller than "
            f"{min_lr_size}x{min_lr_size}")
      self.hr.append(hr)
      self.lr.append(bicubic_downscale(hr, scale))

  def __len__(self) -> int:
    return len(self.hr)


def augment_pair(lr: np.ndarray, hr: np.ndarray, hflip: bool, vflip: bool,
                 transpose: bool) -> tuple[np.ndarray, np.ndarray]:
  """The same dihedral transform of an LR patch and its HR patch."""
  def apply(x):
    if hflip:
      x = x[:, ::-1]
    if vflip:
      x = x[::-1, :]
    if transpose:
      x = x.transpose(1, 0, 2)
    return x
  return apply(lr), apply(hr)


def sample_batch(data: ImageFolderSR, batch_size: int, patch_size: int,
                 seed: int, step: int, augment: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Random aligned (LR, HR) uint8 patches for training step `step`.

  Each example picks an image uniformly, a uniform LR offset (y, x), the LR
  patch `[y:y+p, x:x+p]` and the HR patch `[s*y:s*(y+p), s*x:s*(x+p)]`, then
  (with `augment`) a random flip/flip/transpose applied to both.

  Returns:
    `(lr, hr)`: uint8 arrays (batch, p, p, 3) and (batch, s*p, s*p, 3).
  """
  rng = np.random.default_rng([seed, step])
  s, p = data.scale, patch_size
  lrs = np.empty((batch_size, p, p, 3), np.uint8)
  hrs = np.empty((batch_size, s * p, s * p, 3), np.uint8)
  for i in range(batch_size):
    k = int(rng.integers(len(data)))
    lr_img, hr_img = data.lr[k], data.hr[k]
    y = int(rng.integers(lr_img.shape[0] - p + 1))
    x = int(rng.integers(lr_img.shape[1] - p + 1))
    lr = lr_img[y:y + p, x:x + p]
    hr = hr_img[s * y:s * (y + p), s * x:s * (x + p)]
    flips = rng.integers(2, size=3) if augment else (0, 0, 0)
    lrs[i], hrs[i] = augment_pair(lr, hr, *(bool(f) for f in flips))
  return lrs, hrs
