"""The paper's recipe (Szegedy et al. 2014) on ImageNet: SGD momentum 0.9, lr x0.96 every 8
epochs, Polyak (EMA) weights for evaluation, 8-100% area crops with aspect 3/4-4/3,
photometric distortion, aux loss weight 0.3, dropout 0.4 / aux 0.7 (the paper layout's).

Differs from the paper in two named places: synchronous SGD on one global batch (the paper
trained asynchronously on DistBelief), and PyTorch's coupled weight decay 2e-4 (the paper does
not state its decay; 2e-4 is Caffe's bvlc_googlenet solver)."""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "paper"
  config.num_classes = 1000
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.channels = 3
  config.normalize = "imagenet"
  config.augment = "inception_crop_photometric"
  config.random_flip = True
  config.eval_crop_fraction = 0.875
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = 250.0
  config.optimizer = "sgd"
  config.learning_rate = 0.01 * config.batch_size / 32
  config.weight_decay = 2e-4
  config.lr_schedule = "step"
  config.decay_epochs = 8.0
  config.decay_rate = 0.96
  config.ema_decay = 0.9999
  config.eval_with_ema = True
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.keep_best = True
  config.shuffle_buffer = 16384
  return config
