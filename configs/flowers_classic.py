"""The classic recipe (the training script of the reference PyTorch implementation of the
classic layout): a folder of class subfolders (flower_photos, 5 classes, 10% held out), Adam
3e-4, batch 32, 30 epochs, RandomResizedCrop(224) + flip, normalised with mean 0.5 / std 0.5,
eval resizes to 224x224, keeps the best-accuracy weights.

  python train.py --config configs/flowers_classic.py --config.dataset=folder:/data/flower_photos
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "classic"
  config.num_classes = 0  # 0: from the folder's classes
  config.dataset = "folder:flower_photos"
  config.val_fraction = 0.1
  config.image_size = 224
  config.normalize = "half"
  config.augment = "inception_crop"
  config.random_flip = True
  config.eval_crop_fraction = 1.0
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_epochs = 30.0
  config.optimizer = "adam"
  config.learning_rate = 3e-4
  config.weight_decay = 0.0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  config.keep_best = True
  return config
