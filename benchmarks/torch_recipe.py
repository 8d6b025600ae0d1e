"""The project's training recipes written as a PyTorch user writes them: `torch.optim`,
`torch.optim.lr_scheduler` stepped once per iteration, `nn.CrossEntropyLoss`, the auxiliary
heads' losses weighted as in the seed notes. Read from the same ml_collections config that
train.py takes, so that tests/test_fidelity.py and benchmarks/fidelity.py can train one recipe
in both frameworks. Nothing here imports JAX.
"""

from __future__ import annotations

import torch
from torch import nn


def parameter_groups(model: nn.Module, config) -> list[dict]:
  """One group, or two when BatchNorm parameters and biases are not decayed (every parameter
  of rank < 2, as torchvision's reference --norm-weight-decay 0 --bias-weight-decay 0)."""
  params = [p for p in model.parameters() if p.requires_grad]
  if config.weight_decay_norm_and_bias:
    return [{"params": params}]
  return [{"params": [p for p in params if p.ndim > 1]},
          {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
  groups = parameter_groups(model, config)
  lr, wd = config.learning_rate, config.weight_decay
  kind = config.optimizer
  if kind == "sgd":
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=wd)
  if kind in ("adam", "adamw"):
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
               weight_decay=wd)
  if kind == "rmsprop":
    if config.rmsprop_style != "pytorch":
      raise ValueError("torch.optim.RMSprop has PyTorch's form only; see TensorFlowRMSprop")
    return torch.optim.RMSprop(groups, lr=lr, alpha=config.rmsprop_decay,
                               eps=config.rmsprop_eps, momentum=config.momentum,
                               weight_decay=wd)
  raise ValueError(f"no PyTorch optimizer for {kind!r}")


class TensorFlowRMSprop(torch.optim.Optimizer):
  """RMSprop in TensorFlow's form (tf.keras / tf.compat.v1 / optax), which differs from
  torch.optim.RMSprop in two lines: eps inside the square root, and the learning rate applied
  inside the momentum buffer. Otherwise torch.optim.RMSprop's algorithm (zero-initialised
  average, coupled weight decay)."""

  def __init__(self, params, lr, alpha, eps, momentum=0.0, weight_decay=0.0):
    super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                                  weight_decay=weight_decay))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        g = p.grad
        if group["weight_decay"]:
          g = g.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if not state:
          state["square_avg"] = torch.zeros_like(p)
          state["momentum_buffer"] = torch.zeros_like(p)
        v = state["square_avg"]
        v.mul_(group["alpha"]).addcmul_(g, g, value=1 - group["alpha"])
        step = g / (v + group["eps"]).sqrt()  # torch.optim.RMSprop: g / (v.sqrt() + eps)
        if group["momentum"]:
          buf = state["momentum_buffer"]
          buf.mul_(group["momentum"]).add_(step, alpha=group["lr"])  # torch: add_(step)
          p.sub_(buf)  # torch: p.sub_(buf, alpha=lr)
        else:
          p.sub_(step, alpha=group["lr"])


def make_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
  if config.optimizer == "rmsprop" and config.rmsprop_style == "tensorflow":
    return TensorFlowRMSprop(parameter_groups(model, config), lr=config.learning_rate,
                             alpha=config.rmsprop_decay, eps=config.rmsprop_eps,
                             momentum=config.momentum, weight_decay=config.weight_decay)
  return optimizer(model, config)


def scheduler(opt: torch.optim.Optimizer, config, steps_per_epoch: int, num_steps: int):
  """The config's schedule, stepped after every optimizer step."""
  sched = torch.optim.lr_scheduler
  warmup = int(config.warmup_epochs * steps_per_epoch)
  span = max(1, num_steps - warmup)
  kind = config.lr_schedule
  if kind == "constant":
    main = sched.LambdaLR(opt, lambda _: 1.0)
  elif kind == "step":
    main = sched.StepLR(opt, step_size=max(1, int(config.decay_epochs * steps_per_epoch)),
                        gamma=config.decay_rate)
  elif kind == "cosine":
    main = sched.CosineAnnealingLR(opt, T_max=span)
  elif kind == "poly":
    main = sched.PolynomialLR(opt, total_iters=span, power=config.poly_power)
  else:
    raise ValueError(f"no PyTorch scheduler for {kind!r}")
  if not warmup:
    return main
  ramp = sched.LinearLR(opt, start_factor=config.warmup_start_factor, total_iters=warmup)
  return sched.SequentialLR(opt, [ramp, main], milestones=[warmup])


def loss(outputs, labels, config) -> torch.Tensor:
  """Cross-entropy of the main head plus aux_loss_weight times each auxiliary head's.
  `outputs`: logits, or (logits, aux_after_4d, aux_after_4a) in train mode (torchvision's
  GoogLeNetOutputs or the seed model's tuple)."""
  criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
  if isinstance(outputs, torch.Tensor):
    return criterion(outputs, labels)
  logits, aux2, aux1 = outputs
  return criterion(logits, labels) + config.aux_loss_weight * (
      criterion(aux1, labels) + criterion(aux2, labels))


def train(model: nn.Module, batches, config, steps_per_epoch: int, num_steps: int,
          on_step=None) -> list[float]:
  """Train `model` on `batches` (NCHW tensors and labels) with the config's recipe; returns
  the loss of every step. `on_step(step, model, losses)` is called after each step."""
  opt = make_optimizer(model, config)
  sched = scheduler(opt, config, steps_per_epoch, num_steps)
  model.train()
  losses = []
  for step, (images, labels) in enumerate(batches, 1):
    opt.zero_grad()
    value = loss(model(images), labels, config)
    value.backward()
    opt.step()
    sched.step()
    losses.append(value.item())
    if on_step is not None:
      on_step(step, model, losses)
  return losses
