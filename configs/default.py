"""The README's main job: GoogLeNet (torchvision layout, BatchNorm) on scikit-learn's bundled
handwritten digits at 64x64, offline, a few minutes on 2 CPU cores, >= 95% validation top-1.

The recipe (SGD momentum 0.9, lr 0.05 with cosine decay, weight decay 1e-4, batch 64, 6
epochs) follows the one measured in PyTorch on these digits (constant lr there): a plain-ReLU
layout (d2l, classic) stays at chance for this many steps; BatchNorm leaves the plateau at once.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Model.
  config.variant = "torchvision"
  config.num_classes = 10  # 0: the dataset's class count
  config.aux_logits = ml_collections.config_dict.placeholder(bool)  # None: the variant's
  config.dropout = ml_collections.config_dict.placeholder(float)
  config.aux_dropout = ml_collections.config_dict.placeholder(float)
  config.transform_input = False
  config.half_precision = False
  # The network's kernels (`GoogLeNet.ops`): "auto" (XLA:CPU's faster ones on the CPU backend,
  # plain lax elsewhere), "lax", "cpu-xla" (no oneDNN) or "cpu-onednn". The same parameters and,
  # to rounding, the same values.
  config.ops = "auto"
  # Compute and keep parameters, statistics and optimiser state in float64 (train.py turns on
  # jax_enable_x64); the weights are drawn in float32 and widened, so a float64 run starts where
  # the float32 run does. For equivalence tests: float32 rounding is amplified by this network.
  config.float64 = False
  # Fine-tuning: start from this model directory's weights (a train.py workdir or a
  # `python -m googlenet_jax.tools.convert` output); classifiers of another num_classes are replaced.
  config.init_from = ""
  # Data.
  config.dataset = "sklearn_digits"
  config.data_dir = ""  # TFDS data_dir ("" = TFDS default)
  config.manual_dir = ""  # TFDS manual download dir (ImageNet)
  config.val_fraction = 0.1  # folder datasets without train/ and val/
  config.train_split = ""  # TFDS split to train on ("" = "train")
  config.eval_split = ""  # TFDS split to evaluate on ("" = "validation", else "test")
  config.image_size = 64
  config.channels = 3  # grey digits repeated to RGB
  config.normalize = "half"  # [-1, 1]
  config.augment = "none"
  config.crop_area_range = (0.08, 1.0)
  config.random_flip = False
  config.eval_crop_fraction = 1.0  # 1.0: resize the whole image to image_size
  config.shuffle_buffer = 1024
  # The input pipeline: "tfdata" (TensorFlow; every source, TPUs and CPUs) or "dali" (NVIDIA
  # DALI, the googlenet_jax[dali] extra: decodes on the GPU on a GPU backend; folders and TFDS
  # records of JPEG/PNG images; the same examples, crops and flips as tf.data).
  config.data_loader = "tfdata"
  config.data_threads = 0  # tf.data's threads for decoding and augmenting; 0: one per core
  config.prefetch_batches = 2  # batches prepared ahead on the host
  config.device_prefetch = 2  # and copied to the devices ahead of the step (shard_map)
  # Optimisation.
  config.batch_size = 64  # global, over all devices and processes
  config.eval_batch_size = 128  # 0: batch_size
  config.num_epochs = 6.0
  config.num_train_steps = 0  # > 0 overrides num_epochs
  # The optimisers are PyTorch's, name for name (`create_optimizer`): sgd = torch.optim.SGD,
  # adam = Adam, adamw = AdamW, rmsprop = RMSprop; weight_decay is SGD's / Adam's coupled L2
  # term (AdamW's decoupled one). tests/test_fidelity.py trains each against PyTorch.
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9  # sgd and rmsprop (0: none)
  config.nesterov = False
  config.weight_decay = 1e-4
  config.weight_decay_norm_and_bias = True  # False: BatchNorm parameters and biases undecayed
  config.adam_b1 = 0.9  # adam / adamw: PyTorch's betas and eps
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.rmsprop_decay = 0.99  # PyTorch's alpha
  config.rmsprop_eps = 1e-8
  # "pytorch": sqrt(v) + eps, lr applied after the momentum buffer; "tensorflow" (TF / Keras /
  # optax): sqrt(v + eps), lr inside the momentum buffer. A TF recipe's eps (Inception: 1.0)
  # means something else in the other form.
  config.rmsprop_style = "pytorch"
  # Cosine decay to 0 over the run: with a constant rate the last evaluations swing with the
  # kernels' rounding; decayed, the run settles (benchmarks/NOTES.md, "The digits recipe's
  # learning-rate schedule").
  config.lr_schedule = "cosine"
  config.warmup_epochs = 0.0
  # The warm-up ramps from warmup_start_factor * learning_rate (PyTorch's LinearLR
  # start_factor; torchvision's reference recipe uses 0.01) to learning_rate.
  config.warmup_start_factor = 0.01
  config.decay_epochs = 8.0
  config.decay_rate = 0.96
  config.poly_power = 0.5
  config.label_smoothing = 0.0
  config.aux_loss_weight = 0.3
  config.ema_decay = 0.0  # > 0: keep Polyak/EMA weights
  # The optimiser's state as one vector (optax.flatten): fewer kernels, faster to compile.
  # A workdir resumes in the form its checkpoints hold, whatever this says.
  config.flat_optimizer_state = True
  config.eval_with_ema = False
  # Parallelism and bookkeeping.
  # Data parallelism (train/parallel.py): "shard_map" (jax.jit over jax.shard_map on a 1-D
  # mesh, what JAX recommends now that jax.pmap is in maintenance) or "pmap"; the same
  # per-device step either way, and the same numbers (tests/test_training.py).
  config.parallel = "shard_map"
  config.seed = 0
  config.log_every_steps = 5
  config.eval_every_steps = 0  # 0: once per epoch
  config.checkpoint_every_steps = 50
  config.keep_checkpoints = 2  # None: every one
  config.keep_best = False
  config.async_checkpointing = True
  config.skip_nonfinite_steps = 0  # 0: stop at a non-finite loss; N: skip up to N in a row
  config.progress_bar = True
  return config
