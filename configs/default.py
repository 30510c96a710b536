"""Shared defaults of every training config (`get_base_config()`).

Not a runnable experiment by itself: each `configs/<name>.py` starts from
`get_base_config()` and sets the dataset, the model and the recipe. Every key
is documented here; experiment files comment only what they change.
"""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  """The keys every training config has, with the official CIFAR recipe."""
  config = ml_collections.ConfigDict()

  # ---- Task (docs/design.md §2). ----
  # 'classification' (this file's keys) or 'sr' (AdderSR super-resolution:
  # configs/sr_*.py add their own keys, see docs/addersr.md).
  config.task = 'classification'
  # Dataset name: 'cifar10', 'cifar100', 'mnist', 'imagenet2012' or 'digits'.
  config.dataset = 'cifar10'
  # None: TensorFlow Datasets (downloads where the network allows). A local
  # directory is read in its own layout (ImageFolder, CIFAR pickles, MNIST
  # IDX, TFDS data_dir). Set it with `--config.data_dir=/path`.
  config.data_dir = config_dict.placeholder(str)
  # Model name for `addernet_jax.models.get_model` (resnet20, vgg_small, ...).
  config.model = 'resnet20'
  # 'adder' (AdderNet) or 'mult' (the identical CNN baseline).
  config.conv = 'adder'
  # Number of classes of the output layer (must match the dataset).
  config.num_classes = 10

  # ---- Optimisation (official recipe: docs/design.md §1). ----
  # Global batch size over all devices and hosts (must divide by the number
  # of devices).
  config.batch_size = 256
  # Training length in epochs: every epoch trains at a non-zero rate (the
  # cosine below spans num_epochs + 1 epochs). 399 is the official CIFAR loop
  # (`for epoch in range(1, 400)`), which the paper calls 400 epochs. The last
  # partial batch of each epoch is dropped (CIFAR-10 at 256: 195 steps an
  # epoch; the official PyTorch loader keeps it, 196 steps, the last of 80
  # images)...
  config.num_epochs = 399
  # ...unless this is > 0: then exactly this many steps (overrides
  # num_epochs; the schedule is laid out over ceil(steps / steps per epoch)
  # epochs, plus one, the same way).
  config.num_train_steps = -1
  # Base learning rate of SGD. The schedule is the official per-epoch cosine
  # (addernet_jax.optim.learning_rate_schedule): epoch e = 1..num_epochs runs
  # at learning_rate / 2 * (1 + cos(pi * e / (num_epochs + 1))), constant
  # within it; with num_epochs = 399 that is the official
  # 0.05 * (1 + cos(pi * e / 400)) to the epoch.
  config.learning_rate = 0.1
  # Heavy-ball momentum (no Nesterov).
  config.momentum = 0.9
  # L2 weight decay added to the gradient of every parameter.
  config.weight_decay = 5e-4
  # Adaptive learning-rate coefficient of the adder filters (paper eq. 13);
  # the update of adder layer l is grad * eta * sqrt(k) / ||grad||.
  config.eta = 0.2
  # Apply that adaptive learning rate at all (False: plain SGD on the adder
  # filters too, an ablation).
  config.adaptive_lr = True
  # PRNG seed: initialisation, data order and augmentation.
  config.seed = 0
  # Start a new run from trained weights instead of random ones: a training
  # workdir of this project (its latest checkpoint) or an official-layout
  # PyTorch checkpoint (.pth, e.g. the AdderNet release's ResNet-20). Only
  # the parameters and BatchNorm statistics are taken; the step, optimizer
  # state, schedule and data order start afresh. The model, conv kind and
  # classes must be the config's (a workdir's dataset too). Read only when
  # the workdir holds no checkpoint: a resumed run continues from its own.
  # None: random initialisation from `seed`.
  config.init_from = config_dict.placeholder(str)

  # ---- Distillation (docs/pkkd.md). ----
  # 'none': plain training. 'pkkd': kernel based progressive distillation
  # (Xu et al., NeurIPS 2020): a CNN of the same architecture (conv='mult')
  # is initialised and trained together with the adder network, one jitted
  # step updating both; the adder network (the student, conv must be
  # 'adder') also learns from the CNN's outputs and kernel-mapped features.
  # Checkpoints hold both networks; eval.py evaluates the student.
  config.distill = 'none'
  # PKKD settings (used only with distill='pkkd').
  config.pkkd = ml_collections.ConfigDict()
  # Weight of the student's cross-entropy with the ground truth.
  config.pkkd.ce_weight = 1.0
  # Weight of the output distillation, T^2 * KL(teacher || student) of the
  # softmax at temperature T (the teacher's outputs are not trained by it).
  config.pkkd.kd_weight = 1.0
  # Temperature T of that softmax.
  config.pkkd.temperature = 1.0
  # Weight of the kernel based feature distillation: mean over the distilled
  # layers of the squared error between the student's Laplace-kernel map and
  # the linearly transformed Gaussian-kernel map of the teacher.
  config.pkkd.feature_weight = 1.0
  # Kernel bandwidth of each filter, in standard deviations of its distances
  # over the global batch (sigma_a for the L1 distances of an adder filter,
  # 2 sigma_c^2 for the squared L2 distances of a CNN filter).
  config.pkkd.sigma_scale = 1.0
  # Comma-separated fnmatch patterns of the distilled adder layers, by
  # module path ('layer3_*/conv2', 'conv1,conv2', ...); '*': every adder
  # layer of the student (the stem and classifier are not adder layers).
  config.pkkd.layers = '*'
  # Epochs over which the distillation terms ramp up linearly from ~0 to
  # their weights (0: full weight from the first step).
  config.pkkd.warmup_epochs = 0.0
  # The teacher's SGD learning rate (None: config.learning_rate, same
  # schedule); the teacher never uses the adaptive learning rate.
  config.pkkd.teacher_learning_rate = config_dict.placeholder(float)
  # The teacher's weight decay (None: config.weight_decay).
  config.pkkd.teacher_weight_decay = config_dict.placeholder(float)

  # ---- Input pipeline. ----
  # 'auto': MNIST/CIFAR/digits on the devices, ImageNet streamed; 'streaming'
  # forces the Grain pipeline (an ImageFolder data_dir); 'in_memory' the other.
  config.input_pipeline = 'auto'
  # Grain worker processes per host for streaming (None: CPU count - 1).
  config.num_workers = config_dict.placeholder(int)

  # ---- Numerics and kernels. ----
  # Computation dtype: 'float32', 'bfloat16' or 'float16' (parameters stay
  # float32; adder layers compute and output float32 whatever it says: their
  # outputs in the thousands lose in bfloat16 the spread BatchNorm keeps).
  config.dtype = 'float32'
  # Adder kernel: None (best for the backend), 'xla' or 'pallas'.
  config.implementation = config_dict.placeholder(str)

  # ---- Evaluation. ----
  # Global evaluation batch size (the last batch is padded and masked, so
  # every test example counts exactly once).
  config.eval_batch_size = 500
  # Evaluate on the test split every this many epochs (and at the end).
  config.eval_every_epochs = 1
  # > 0: evaluate on at most this many test examples (quick checks only).
  config.eval_max_examples = -1
  # > 0: hold back the LAST this many training examples as the evaluation
  # set instead of the test split (train on the rest). For data without a
  # test split, e.g. MNIST with only the train-*-idx files (10000).
  config.holdout_examples = 0
  # > 0: also report `eval_top1_recalibrated`, the test accuracy after
  # re-estimating the BatchNorm statistics on this many (un-augmented)
  # training batches: running statistics lag behind an AdderNet while the
  # learning rate is high (docs/design.md §5). 0 disables it.
  config.recalibrate_bn_batches = 4

  # ---- Bookkeeping. ----
  # Save a checkpoint every this many steps; 0 or -1: at the end of every
  # epoch. Always saved at the end and on SIGTERM.
  config.checkpoint_every_steps = -1
  # Number of recent checkpoints kept (the best by eval_top1 is kept too).
  config.max_checkpoints_to_keep = 3
  # Log training metrics (metrics.jsonl, TensorBoard) every this many steps.
  config.log_every_steps = 50
  # Show a tqdm progress bar (images/s, ETA) when stderr is a terminal.
  config.progress_bar = True
  return config
