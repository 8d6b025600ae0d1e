"""The d2l recipe (section 7.4): Fashion-MNIST resized to 96x96, 1 channel, SGD lr 0.1,
batch 128, 10 epochs, no augmentation, cross entropy (no aux heads in this layout)."""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "d2l"
  config.num_classes = 10
  config.dataset = "fashion_mnist"
  config.image_size = 96
  config.channels = 1
  config.normalize = "unit"
  config.augment = "none"
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 10.0
  config.optimizer = "sgd"
  config.momentum = 0.0
  config.learning_rate = 0.1
  config.weight_decay = 0.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
