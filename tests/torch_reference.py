"""PyTorch models of the classic and d2l layouts, written after the reference PyTorch
implementations of those layouts (a PyTorch course model; Dive into Deep Learning section 7.4),
for parity tests. State_dict names are the reference implementations'."""

import torch
from torch import nn
from torch.nn import functional as F

# (in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), the paper's Table 1.
BLOCKS = {
    "3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class ConvReLU(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, **kw)

  def forward(self, x):
    return F.relu(self.conv(x))


class ClassicInception(nn.Module):
  def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
    super().__init__()
    self.branch1 = ConvReLU(cin, c1, kernel_size=1)
    self.branch2 = nn.Sequential(ConvReLU(cin, c3r, kernel_size=1),
                                 ConvReLU(c3r, c3, kernel_size=3, padding=1))
    self.branch3 = nn.Sequential(ConvReLU(cin, c5r, kernel_size=1),
                                 ConvReLU(c5r, c5, kernel_size=5, padding=2))
    self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                 ConvReLU(cin, pp, kernel_size=1))

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class ClassicAux(nn.Module):
  def __init__(self, cin, num_classes, p):
    super().__init__()
    self.p = p
    self.pool = nn.AvgPool2d(5, stride=3)
    self.conv = ConvReLU(cin, 128, kernel_size=1)
    self.fc1 = nn.Linear(2048, 1024)
    self.fc2 = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = torch.flatten(self.conv(self.pool(x)), 1)
    x = F.dropout(x, self.p, training=self.training)
    x = F.dropout(F.relu(self.fc1(x)), self.p, training=self.training)
    return self.fc2(x)


class ClassicGoogLeNet(nn.Module):
  """The PyTorch course model (the reference implementation of the classic layout). Train mode
  returns (logits, aux2, aux1)."""

  def __init__(self, num_classes=1000, aux_logits=True, dropout=0.4, aux_dropout=0.5):
    super().__init__()
    self.aux_logits = aux_logits
    self.conv1 = ConvReLU(3, 64, kernel_size=7, stride=2, padding=3)
    self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.conv2 = ConvReLU(64, 64, kernel_size=1)
    self.conv3 = ConvReLU(64, 192, kernel_size=3, padding=1)
    self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    for name in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"):
      setattr(self, "inception" + name, ClassicInception(*BLOCKS[name]))
    self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    if aux_logits:
      self.aux1 = ClassicAux(512, num_classes, aux_dropout)
      self.aux2 = ClassicAux(528, num_classes, aux_dropout)
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(1024, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.uniform_(m.bias, -0.1, 0.1)  # random, not zero: parity must see the biases
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.uniform_(m.bias, -0.1, 0.1)

  def forward(self, x):
    x = self.maxpool1(self.conv1(x))
    x = self.maxpool2(self.conv3(self.conv2(x)))
    x = self.maxpool3(self.inception3b(self.inception3a(x)))
    x = self.inception4a(x)
    aux = self.training and self.aux_logits
    if aux:
      aux1 = self.aux1(x)
    x = self.inception4d(self.inception4c(self.inception4b(x)))
    if aux:
      aux2 = self.aux2(x)
    x = self.maxpool4(self.inception4e(x))
    x = self.inception5b(self.inception5a(x))
    x = self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
    if aux:
      return x, aux2, aux1
    return x


class D2LInception(nn.Module):
  def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
    super().__init__()
    self.p1_1 = nn.Conv2d(cin, c1, kernel_size=1)
    self.p2_1 = nn.Conv2d(cin, c3r, kernel_size=1)
    self.p2_2 = nn.Conv2d(c3r, c3, kernel_size=3, padding=1)
    self.p3_1 = nn.Conv2d(cin, c5r, kernel_size=1)
    self.p3_2 = nn.Conv2d(c5r, c5, kernel_size=5, padding=2)
    self.p4_1 = nn.MaxPool2d(3, stride=1, padding=1)
    self.p4_2 = nn.Conv2d(cin, pp, kernel_size=1)

  def forward(self, x):
    p1 = F.relu(self.p1_1(x))
    p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
    p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
    p4 = F.relu(self.p4_2(self.p4_1(x)))
    return torch.cat((p1, p2, p3, p4), dim=1)


def d2l_googlenet(num_classes=10):
  """d2l section 7.4: nn.Sequential(b1, b2, b3, b4, b5, Linear), 1 input channel."""
  pool = lambda: nn.MaxPool2d(3, stride=2, padding=1)
  b1 = nn.Sequential(nn.Conv2d(1, 64, 7, stride=2, padding=3), nn.ReLU(), pool())
  b2 = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 192, 3, padding=1),
                     nn.ReLU(), pool())
  b3 = nn.Sequential(D2LInception(*BLOCKS["3a"]), D2LInception(*BLOCKS["3b"]), pool())
  b4 = nn.Sequential(*[D2LInception(*BLOCKS[n]) for n in ("4a", "4b", "4c", "4d", "4e")], pool())
  b5 = nn.Sequential(D2LInception(*BLOCKS["5a"]), D2LInception(*BLOCKS["5b"]),
                     nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
  net = nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes))
  for m in net.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      nn.init.xavier_uniform_(m.weight)
  return net


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
  """Random affine parameters and running statistics, so that parity sees every BN term."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=generator)
        m.bias.uniform_(-0.5, 0.5, generator=generator)
        m.running_mean.uniform_(-0.5, 0.5, generator=generator)
        m.running_var.uniform_(0.5, 1.5, generator=generator)
