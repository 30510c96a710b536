"""Image-quality metrics of the SR literature: PSNR and SSIM on the Y channel.

The convention of EDSR-PyTorch's `calc_psnr` (MATLAB evaluation scripts that
call `rgb2ycbcr` on uint8 images round Y to integers as well: about 0.02 dB
lower PSNR and 0.001 lower SSIM on bicubic x2):

* the network output is quantised to 8 bits (`quantize`: round, clip to
  [0, 255]) before it is compared;
* both images go to the Y channel of ITU-R BT.601 YCbCr, as MATLAB's
  `rgb2ycbcr`: `Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255` for R, G, B
  in [0, 255] (Y in [16, 235]), kept in float64 (not rounded again);
* `scale` pixels are cropped from every border (`shave`);
* PSNR = 10 log10(255^2 / MSE); SSIM (Wang et al. 2004) with an 11x11
  Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255,
  population (not sample) covariances, averaged over the positions where the
  window fits inside the image: what `skimage.metrics.structural_similarity(
  ..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255)` and MATLAB's `ssim_index` compute.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# BT.601 (MATLAB rgb2ycbcr) luma weights for R, G, B in [0, 255].
Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
Y_OFFSET = 16.0


def rgb_to_y(image: np.ndarray) -> np.ndarray:
  """Y of BT.601 YCbCr (MATLAB `rgb2ycbcr`) of an RGB image in [0, 255]
  (uint8 or float, shape (..., 3)), as float64 in [16, 235]. A one-channel
  image (shape (..., 1) or 2-D) is taken to be Y already."""
  image = np.asarray(image, np.float64)
  if image.ndim == 2:
    return image
  if image.shape[-1] == 1:
    return image[..., 0]
  if image.shape[-1] != 3:
    raise ValueError(f"rgb_to_y: expected 3 channels (RGB) or 1 (Y), got "
                     f"shape {image.shape}")
  return Y_OFFSET + image @ Y_WEIGHTS


def quantize(image: np.ndarray) -> np.ndarray:
  """A float image in [0, 1] -> float64 integers in [0, 255] (round, clip),
  the 8-bit image a network's output is saved as."""
  return np.clip(np.round(np.asarray(image, np.float64) * 255.0), 0, 255)


def shave(image: np.ndarray, border: int) -> np.ndarray:
  """Crops `border` pixels from each side of the first two axes."""
  if border <= 0:
    return image
  if image.shape[0] <= 2 * border or image.shape[1] <= 2 * border:
    raise ValueError(f"image of shape {image.shape} is too small to crop "
                     f"{border} pixels from each border")
  return image[border:-border, border:-border]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
  """Peak signal-to-noise ratio in dB of two images of the same shape
  (infinity when they are equal)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
  mse = np.mean((a - b) ** 2)
  if mse == 0:
    return float("inf")
  return float(10.0 * np.log10(data_range ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0,
         sigma: float = 1.5) -> float:
  """Mean SSIM of two single-channel (2-D) images, Gaussian window.

  The window is a Gaussian of `sigma` truncated at 3.5 sigma (11x11 for 1.5),
  statistics with population covariances; the SSIM map is averaged over the
  positions whose window lies inside the image (the border of half a window
  is cropped), as scikit-image and the MATLAB reference do.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"ssim: expected two 2-D images of the same shape, got "
                     f"{a.shape} and {b.shape}")
  truncate = 3.5
  radius = int(truncate * sigma + 0.5)
  if min(a.shape) < 2 * radius + 1:
    raise ValueError(f"ssim: image of shape {a.shape} is smaller than the "
                     f"{2 * radius + 1}x{2 * radius + 1} window")
  blur = lambda x: ndimage.gaussian_filter(x, sigma=sigma, truncate=truncate)
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a * mu_a
  var_b = blur(b * b) - mu_b * mu_b
  cov = blur(a * b) - mu_a * mu_b
  c1 = (0.01 * data_range) ** 2
  c2 = (0.03 * data_range) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
       / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return float(s[radius:-radius, radius:-radius].mean())


def y_psnr_ssim(output: np.ndarray, target: np.ndarray, border: int
                ) -> tuple[float, float]:
  """PSNR and SSIM on the Y channel after cropping `border` pixels.

  Args:
    output: the restored image in [0, 255] (RGB (h, w, 3), or Y (h, w) /
      (h, w, 1)), already quantised by the caller if it should be.
    target: the ground truth, same layout, in [0, 255].
    border: pixels cropped from each side (the scale factor, by custom).
  """
  y_out = shave(rgb_to_y(output), border)
  y_ref = shave(rgb_to_y(target), border)
  return psnr(y_out, y_ref), ssim(y_out, y_ref)
