"""The torchvision layout (BatchNorm) on ImageNet with a modern SGD + cosine recipe."""

from configs import imagenet_paper


def get_config():
  config = imagenet_paper.get_config()
  config.variant = "torchvision"
  config.augment = "inception_crop"
  config.num_epochs = 90.0
  config.learning_rate = 0.1 * config.batch_size / 256
  config.weight_decay = 1e-4
  config.lr_schedule = "cosine"
  config.warmup_epochs = 2.0
  config.ema_decay = 0.0
  config.eval_with_ema = False
  return config
