"""Reference networks with seeded random weights, for benchmarks, examples and tests.

``resnet18_cifar`` is the ResNet-18 commonly trained on CIFAR-10 (3x3 stem, no max-pool, four stages
of two basic blocks, 64 to 512 channels, 32x32 inputs); ``resnet50_imagenet`` a ResNet-50-shaped
network for 224x224 inputs; ``conv_layers`` lists a network's conv and
linear layers with the spatial size of the input each one sees.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lipfast._util import eval_mode, input_type

__all__ = ["BasicBlock", "Bottleneck", "resnet18_cifar", "resnet50_imagenet", "conv_layers", "eval_forward"]


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


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4, batch norms, and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, in_planes = [], 64
        for planes, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = 4 * planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet50_imagenet(num_classes: int = 1000, *, seed: int = 0) -> nn.Module:
    """A ResNet-50-shaped network for 224x224 images (torchvision's layout: 7x7 stem, max-pool, four
    stages of 3, 4, 6, 3 bottlenecks), seeded random weights as in :func:`resnet18_cifar`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet50(num_classes).eval()


def eval_forward(model: nn.Module, x: torch.Tensor):
    """model(x) in eval mode and without autograd, every module's own mode restored afterwards: a probe
    that leaves no trace (no BatchNorm statistics or spectral-norm iterates updated)."""
    with eval_mode(model), torch.no_grad():
        return model(x)


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
        dtype, device = input_type(model)
        eval_forward(model, torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
    return found
