"""AdderSR EDSR baseline, x2 (Song et al., CVPR 2021; docs/addersr.md).

EDSR baseline (16 residual blocks, 64 channels) whose inner convolutions are
adder units (self-shortcut, BatchNorm, learnable power activation); the first,
last and upsampler convolutions multiply. Trained on a folder of HR images
(DIV2K_train_HR, 800 images) with bicubic LR made on the fly, random 48x48 LR
patches, flips and rotations, L1 loss, Adam; evaluated with PSNR/SSIM on the
Y channel (border 2) on a folder of HR test images (e.g. Set5).

Run:
  python train.py --config configs/sr_edsr_x2.py --workdir DIR \
      --config.data_dir=/path/DIV2K_train_HR --config.eval_data_dir=/path/Set5
  python eval.py --config configs/sr_edsr_x2.py --checkpoint DIR \
      --config.eval_data_dir=/path/Set14   # any benchmark folder
  CNN baseline: add --config.conv=mult.

Expected result (paper, Table 3, x2, Set5): AdderSR 37.92 dB / 0.9589 SSIM,
the CNN (EDSR baseline) 38.11 dB / 0.9601. Not reproduced here (a full run is
300,000 steps; see README for what was measured).
"""

import ml_collections
from ml_collections import config_dict

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The EDSR-baseline x2 recipe (EDSR's, which AdderSR follows)."""
  config = default.get_base_config()
  config.task = 'sr'
  # Informational: SR data is a folder of HR images (data_dir).
  config.dataset = 'image_folder'
  config.model = 'edsr_baseline'
  # No classifier in an SR network.
  config.num_classes = 0
  # Folder of HR training images (PNG/JPEG/BMP, not recursive), e.g.
  # DIV2K_train_HR; LR images are made from them (PIL bicubic).
  config.data_dir = config_dict.placeholder(str)
  # Folder of HR evaluation images (Set5, Set14, B100, Urban100, ...).
  config.eval_data_dir = config_dict.placeholder(str)
  # Upscaling factor: 2, 3 or 4.
  config.scale = 2
  # Colour channels the network sees: None (the model's own: EDSR 3 = RGB,
  # VDSR 1 = Y), 3 or 1.
  config.colors = config_dict.placeholder(int)
  # Network size overrides (None: the published size): EDSR residual blocks,
  # VDSR layers, channels.
  config.num_blocks = config_dict.placeholder(int)
  config.depth = config_dict.placeholder(int)
  config.features = config_dict.placeholder(int)
  # The two AdderSR fixes of the adder units (ablations; conv='adder' only).
  config.self_shortcut = True
  config.power_activation = True
  # Adder units start as the identity (BatchNorm scale 0; with the
  # self-shortcut and alpha = 1 the unit passes its input through), so the
  # untrained network is the head and tail convolutions around an identity
  # body. False: BatchNorm's usual scale 1. (conv='adder' with
  # self_shortcut only.)
  config.identity_init = True
  # LR patch side; the HR patch is scale times larger (EDSR: 48).
  config.patch_size = 48
  # Random flips and transposition of every patch pair.
  config.augment = True
  # > 0: use only the first N training images (quick checks).
  config.train_max_images = -1
  # EDSR: batch 16, Adam(0.9, 0.999, 1e-8), lr 1e-4 halved every 200k steps,
  # 300 "epochs" of 1000 steps, L1 loss, no weight decay.
  config.batch_size = 16
  config.learning_rate = 1e-4
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.lr_decay_steps = 200_000
  config.lr_decay_factor = 0.5
  config.weight_decay = 0.0
  config.momentum = 0.0  # unused by Adam
  # AdderNet's adaptive learning rate on the adder filters before Adam
  # (eta as in AdderNet); off: Adam already normalises every update.
  config.adaptive_lr = False
  # Optimiser steps per "epoch" (the unit of num_epochs, evaluation and
  # checkpoints; EDSR's --test_every 1000).
  config.steps_per_epoch = 1000
  config.num_epochs = 300
  # Evaluate every this many steps (0 or -1: every epoch) and at the end.
  config.eval_every_steps = 0
  # > 0: evaluate on the first N images of eval_data_dir only.
  config.eval_max_images = -1
  config.log_every_steps = 100
  return config
