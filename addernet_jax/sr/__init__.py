"""AdderSR: super-resolution training and evaluation (see docs/addersr.md).

`metrics` (PSNR/SSIM on the Y channel), `data` (folders of HR images, bicubic
LR, random aligned patches) and `train` (`train_and_evaluate`,
`evaluate_checkpoint`, reached from train.py/eval.py with
`config.task = "sr"`). The networks are in `addernet_jax.models.sr`.
"""
