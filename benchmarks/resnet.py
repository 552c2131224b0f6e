"""ResNet-18 for 32x32 inputs, written out (torchvision is not a dependency).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016): BasicBlocks
``[2, 2, 2, 2]`` at 64-128-256-512 channels, with the CIFAR stem (one 3x3 convolution,
no max-pool) used for 32x32 images. BatchNorm mixes the examples of a batch, which
per-sample gradients (and so DP-SGD) cannot allow: GroupNorm with 32 groups replaces
it, as Opacus' own ``ModuleValidator.fix`` does. 11.2M parameters for 10 classes.
Used by the GPU benchmark section (:mod:`benchmarks.gpu`) only.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["resnet18_32"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet18_32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 with the 32x32 stem and GroupNorm (module docstring)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
        _norm(64),
        nn.ReLU(),
    ]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)
