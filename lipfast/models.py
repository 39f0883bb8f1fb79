"""Reference networks with seeded random weights, for benchmarks, examples and tests.

``resnet18_cifar`` is the ResNet-18 commonly trained on CIFAR-10 (3x3 stem, no max-pool, four stages
of two basic blocks, 64 to 512 channels, 32x32 inputs); ``conv_layers`` lists a network's conv and
linear layers with the spatial size of the input each one sees.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "resnet18_cifar", "conv_layers", "eval_forward"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a residual connection (a 1x1 conv when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False, padding_mode=padding_mode)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False, padding_mode=padding_mode)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, num_classes: int = 10, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False, padding_mode=padding_mode)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks = [BasicBlock(in_planes, planes, stride, padding_mode), BasicBlock(planes, planes, 1, padding_mode)]
            layers.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def resnet18_cifar(num_classes: int = 10, *, seed: int = 0, padding_mode: str = "zeros") -> nn.Module:
    """ResNet-18 for 32x32 CIFAR images, weights drawn with torch's default initialization under
    ``torch.manual_seed(seed)`` semantics (a private generator: the global one is not touched).
    ``padding_mode="circular"`` gives the variant whose 3x3 convs are exact circulants."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNetCIFAR(num_classes, padding_mode).eval()


def eval_forward(model: nn.Module, x: torch.Tensor):
    """model(x) in eval mode and without autograd, every module's own mode restored afterwards: a probe
    that leaves no trace (no BatchNorm statistics or spectral-norm iterates updated)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for m, mode in modes:
            m.training = mode


def conv_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(qualified name, layer, spatial input size) for every conv and linear layer that a forward pass
    on one zero input of ``input_shape`` (no batch dim) reaches, in call order (an eval-mode probe:
    the model is left as it was)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    found: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            def hook(mod, args, name=name):
                found.append((name, mod, tuple(args[0].shape[2:])))
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else None
        eval_forward(model, torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
    return found
