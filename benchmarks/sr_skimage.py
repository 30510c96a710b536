"""AdderSR vs its CNN vs bicubic on scikit-image's sample images (CPU-sized).

Writes a train/test split of the RGB and grey sample images that
scikit-image ships (no download) as PNG folders, trains the adder model and
its CNN twin for a few steps each through `train_lib.train_and_evaluate`
(the code train.py runs) and prints one JSON line per model, then a summary
line: eval PSNR/SSIM on the Y channel (border = scale) of each, and of
bicubic interpolation.

  python benchmarks/sr_skimage.py --workdir /tmp/sr-skimage \
      [--model vdsr] [--depth 5] [--features 16] [--steps 1500] \
      [--patch 16] [--batch 16] [--lr 1e-3] [--lr_decay_steps 500] \
      [--scale 2] [--eval_every 250] [--identity_init 0|1]

The defaults are the README's table (about 6 minutes on a 2-core CPU). A
smoke-sized experiment, not the paper's: small networks, few steps, 10
training images. Needs scikit-image (`pip install -e ".[sr]"`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# Sample images bundled with scikit-image (skimage.data, no download).
TRAIN_IMAGES = ("astronaut", "coffee", "rocket", "moon",
                "immunohistochemistry", "hubble_deep_field", "retina",
                "brick", "grass", "gravel")
TEST_IMAGES = ("chelsea", "camera")


def write_split(folder: Path, names=(TRAIN_IMAGES, TEST_IMAGES)) -> tuple[Path, Path]:
  """PNG copies (RGB) of scikit-image sample images in folder/train and
  folder/test."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from skimage import data  # pylint: disable=g-import-not-at-top
  out = []
  for split, images in zip(("train", "test"), names):
    d = folder / split
    d.mkdir(parents=True, exist_ok=True)
    for name in images:
      image = np.asarray(getattr(data, name)())
      Image.fromarray(image).convert("RGB").save(d / f"{name}.png")
    out.append(d)
  return out[0], out[1]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--model", default="vdsr",
                      choices=("vdsr", "edsr_baseline"))
  parser.add_argument("--scale", type=int, default=2)
  parser.add_argument("--depth", type=int, default=5, help="VDSR layers")
  parser.add_argument("--blocks", type=int, default=2, help="EDSR blocks")
  parser.add_argument("--features", type=int, default=16)
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--patch", type=int, default=16, help="LR patch side")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--lr_decay_steps", type=int, default=500,
                      help="> 0: halve the learning rate every N steps "
                      "(EDSR's step decay); 0: constant")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--convs", default="adder,mult")
  parser.add_argument("--identity_init", type=int, default=1, choices=(0, 1),
                      help="1: adder units start as the identity (the "
                      "default); 0: BatchNorm scale 1 (ablation)")
  parser.add_argument("--eval_every", type=int, default=250,
                      help="> 0: also evaluate (and checkpoint) every N "
                      "steps (metrics.jsonl)")
  args = parser.parse_args(argv)
  if importlib.util.find_spec("skimage") is None:
    parser.error("needs scikit-image for its sample images: "
                 "pip install -e \".[sr]\"")

  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  from configs import sr_edsr_x2  # pylint: disable=g-import-not-at-top
  workdir = Path(args.workdir)
  train_dir, test_dir = write_split(workdir / "data")
  results = {}
  for conv in args.convs.split(","):
    config = sr_edsr_x2.get_config()
    config.model = args.model
    config.conv = conv
    config.scale = args.scale
    if args.model == "vdsr":
      config.depth = args.depth
    else:
      config.num_blocks = args.blocks
    config.features = args.features
    config.data_dir, config.eval_data_dir = str(train_dir), str(test_dir)
    config.patch_size = args.patch
    config.batch_size = args.batch
    config.learning_rate = args.lr
    config.lr_decay_steps = args.lr_decay_steps
    config.num_train_steps = args.steps
    config.steps_per_epoch = args.eval_every or args.steps
    config.log_every_steps = 10
    config.seed = args.seed
    config.identity_init = bool(args.identity_init)
    config.progress_bar = False
    summary = train_lib.train_and_evaluate(config, workdir / conv)
    results[conv] = summary
    print(json.dumps({"conv": conv, **summary}), flush=True)
  first = next(iter(results.values()))
  print(json.dumps({
      "model": args.model, "scale": args.scale, "steps": args.steps,
      "bicubic_psnr": first["eval_bicubic_psnr"],
      "bicubic_ssim": first["eval_bicubic_ssim"],
      **{f"{c}_psnr": r["eval_psnr"] for c, r in results.items()},
      **{f"{c}_ssim": r["eval_ssim"] for c, r in results.items()},
      "test_images": list(TEST_IMAGES)}), flush=True)


if __name__ == "__main__":
  main()
