"""Model architectures, chosen by name from a fixed registry.

A ClientApp receives its model specification from the server in every train
message, so models are never instantiated from import strings (``_target_``):
:func:`build_model` only looks a :class:`~fl_app.config.schema.ModelName` up in
:data:`MODEL_REGISTRY`. Every architecture here is compatible with Opacus
DP-SGD: no BatchNorm (GroupNorm instead), only layers Opacus computes per-sample
gradients for. :func:`check_opacus_compatible` verifies that for any model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from fl_app.config.schema import ModelConfig, ModelName
from fl_app.rng import seeded_global_rng

__all__ = [
    "MLP",
    "MODEL_REGISTRY",
    "ModelBuilder",
    "SmallCNN",
    "build_model",
    "check_opacus_compatible",
    "count_parameters",
    "opacus_incompatibilities",
]

ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]
"""Signature of a registry entry: ``(cfg, input_shape, num_classes) -> model``."""

# Spatial size the CNN's adaptive pooling reduces its last feature map to (at most).
_CNN_POOL_TO = 4


def _check_dropout(dropout: float) -> float:
    p = float(dropout)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"model.dropout must lie in [0, 1), found {dropout!r}")
    return p


def _check_num_classes(num_classes: int) -> int:
    n = int(num_classes)
    if n < 1:
        raise ValueError(f"num_classes must be >= 1, found {num_classes!r}")
    return n


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    ``Flatten -> [Linear -> ReLU (-> Dropout)] per hidden width -> Linear``.

    Parameters
    ----------
    cfg : ModelConfig
        Uses ``cfg.hidden`` (hidden widths, may be empty for a linear model) and
        ``cfg.dropout`` (applied after every hidden activation when > 0).
    input_shape : Sequence[int]
        Shape of one example without the batch dimension, e.g. ``[1, 8, 8]``.
    num_classes : int
        Number of output logits.

    Raises
    ------
    ValueError
        If a width, the input shape, the dropout rate or ``num_classes`` is invalid.
    """

    def __init__(self, cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be non-empty with sizes >= 1, found {shape}")
        num_classes = _check_num_classes(num_classes)
        p = _check_dropout(cfg.dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for i, h in enumerate(cfg.hidden):
            if int(h) < 1:
                raise ValueError(f"model.hidden[{i}] must be >= 1, found {h!r}")
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if p > 0:
                layers.append(nn.Dropout(p))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.input_shape = shape
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``[batch, num_classes]``."""
        return self.net(x)


class SmallCNN(nn.Module):
    """Small convolutional network with GroupNorm (Opacus-compatible).

    Per entry ``c`` of ``cfg.channels``: ``Conv2d(3x3, padding 1) -> GroupNorm ->
    ReLU -> MaxPool2d(2)``; the pooling is skipped once the feature map is smaller
    than 2 in either dimension, so tiny inputs (8x8 digits) work with deep stacks.
    Then ``AdaptiveAvgPool2d`` to at most 4x4 (an identity when the map is already
    that small), flatten and one ``Linear`` head, so the head's size stays bounded
    for large inputs.

    The number of GroupNorm groups for a layer with ``c`` channels is
    ``min(cfg.norm_groups, c)``; it must divide ``c``.

    Parameters
    ----------
    cfg : ModelConfig
        Uses ``cfg.channels``, ``cfg.norm_groups`` and ``cfg.dropout`` (dropout
        before the head when > 0).
    input_shape : Sequence[int]
        ``[channels, height, width]`` of one example.
    num_classes : int
        Number of output logits.

    Raises
    ------
    ValueError
        If ``model.norm_groups`` does not divide a layer's channel count, or a
        shape, width, rate or ``num_classes`` is invalid.
    """

    def __init__(self, cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise ValueError(
                f"SmallCNN needs input_shape [channels, height, width] with sizes >= 1, "
                f"found {list(shape)}"
            )
        num_classes = _check_num_classes(num_classes)
        p = _check_dropout(cfg.dropout)
        if not cfg.channels:
            raise ValueError("model.channels must list at least one conv width")
        groups_cfg = int(cfg.norm_groups)
        if groups_cfg < 1:
            raise ValueError(f"model.norm_groups must be >= 1, found {cfg.norm_groups!r}")
        in_ch, h, w = shape
        layers: list[nn.Module] = []
        for i, c in enumerate(cfg.channels):
            c = int(c)
            if c < 1:
                raise ValueError(f"model.channels[{i}] must be >= 1, found {c}")
            groups = min(groups_cfg, c)
            if c % groups != 0:
                raise ValueError(
                    f"model.norm_groups={groups_cfg} does not divide model.channels[{i}]={c}: "
                    "GroupNorm needs the channel count to be a multiple of the group count; "
                    "choose norm_groups dividing every conv width"
                )
            layers += [
                nn.Conv2d(in_ch, c, kernel_size=3, padding=1),
                nn.GroupNorm(groups, c),
                nn.ReLU(),
            ]
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            in_ch = c
        pool_to = (min(h, _CNN_POOL_TO), min(w, _CNN_POOL_TO))
        layers += [nn.AdaptiveAvgPool2d(pool_to), nn.Flatten()]
        if p > 0:
            layers.append(nn.Dropout(p))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch * pool_to[0] * pool_to[1], num_classes)
        self.input_shape = shape
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``[batch, num_classes]`` for ``x`` of ``[batch, C, H, W]``."""
        return self.head(self.features(x))


MODEL_REGISTRY: Mapping[ModelName, ModelBuilder] = MappingProxyType(
    {
        ModelName.mlp: MLP,
        ModelName.cnn: SmallCNN,
    }
)
"""The only models :func:`build_model` can create (read-only)."""


def build_model(
    cfg: ModelConfig,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build the model named by ``cfg.name`` from :data:`MODEL_REGISTRY`.

    Parameters
    ----------
    cfg : ModelConfig
        Model configuration; ``cfg.name`` may be a :class:`ModelName` or its
        string value (as received over the network).
    input_shape : Sequence[int]
        Shape of one example, ``[channels, height, width]``.
    num_classes : int
        Number of output classes.
    seed : int or None, optional
        When given, parameters are initialised deterministically: the build runs
        inside :func:`torch.random.fork_rng` with ``torch.manual_seed(seed)``, so
        torch's global RNG state is the same afterwards as before. When ``None``,
        PyTorch's default initialisation draws from the global RNG.

    Returns
    -------
    torch.nn.Module
        The model, in training mode, on the CPU.

    Raises
    ------
    ValueError
        If the name is not registered or the configuration is invalid.
    """
    try:
        name = ModelName(cfg.name)
    except ValueError:
        known = ", ".join(m.value for m in MODEL_REGISTRY)
        raise ValueError(
            f"model.name={cfg.name!r} is not a known model; choose one of: {known}"
        ) from None
    builder = MODEL_REGISTRY[name]
    shape = tuple(int(s) for s in input_shape)
    if seed is None:
        return builder(cfg, shape, num_classes)
    with seeded_global_rng(int(seed)):
        return builder(cfg, shape, num_classes)


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def opacus_incompatibilities(model: nn.Module) -> list[str]:
    """List why Opacus could not train ``model`` with DP-SGD.

    Runs ``opacus.validators.ModuleValidator.validate(model, strict=False)`` (the
    check :meth:`opacus.PrivacyEngine.make_private` applies) and attributes each
    layer-specific error to the layer's qualified name, e.g.
    ``"layer 'net.1' (BatchNorm2d): BatchNorm cannot support training with
    differential privacy."``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to check. Note that Opacus also reports a model in eval mode.

    Returns
    -------
    list[str]
        Human-readable problems; empty when the model is compatible.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return []
    problems: list[str] = []
    attributed: set[str] = set()
    # Same traversal and validator registry as ModuleValidator.validate, with names.
    for name, sub in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if validator is None:
            continue
        for err in validator(sub):
            attributed.add(str(err))
            label = name or "<root>"
            problems.append(f"layer {label!r} ({type(sub).__name__}): {_first_sentence(str(err))}")
    for err in errors:
        if str(err) not in attributed:
            problems.append(f"model: {_first_sentence(str(err))}")
    return problems


def check_opacus_compatible(model: nn.Module) -> None:
    """Raise if Opacus DP-SGD cannot train ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to check.

    Raises
    ------
    ValueError
        Listing every problem :func:`opacus_incompatibilities` finds.
    """
    problems = opacus_incompatibilities(model)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"model is not compatible with Opacus DP-SGD:\n{listing}")


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Return the number of scalar parameters of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    trainable_only : bool, optional
        Count only parameters with ``requires_grad`` (default: all).

    Returns
    -------
    int
        Total number of parameter elements.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
