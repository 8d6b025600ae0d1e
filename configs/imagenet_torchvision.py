"""The torchvision layout (BatchNorm) on ImageNet with a modern SGD + cosine recipe.

Differs from torchvision's reference classification recipe (references/classification:
SGD momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4, StepLR x0.1 every 30 epochs,
schedulers stepped once per epoch, no warm-up) in its schedule: cosine decay stepped every
iteration after a 2-epoch linear warm-up from 0.01 x lr (the reference's --lr-scheduler
cosineannealinglr --lr-warmup-method linear --lr-warmup-decay 0.01, per iteration instead of
per epoch). torchvision's published GoogLeNet weights were ported from TensorFlow, not
trained with either recipe.
"""

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
