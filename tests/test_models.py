"""Tests for fl_app.models: shapes, registry, determinism, Opacus compatibility."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fl_app.config.schema import ModelConfig, ModelName
from fl_app.models import (
    MLP,
    MODEL_REGISTRY,
    SmallCNN,
    build_model,
    check_opacus_compatible,
    count_parameters,
    opacus_incompatibilities,
)

INPUT_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def _cfg(name: ModelName, **kw: object) -> ModelConfig:
    return ModelConfig(name=name, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("name", [ModelName.mlp, ModelName.cnn])
def test_forward_shapes(name: ModelName, shape: tuple[int, ...]) -> None:
    model = build_model(_cfg(name), shape, num_classes=10, seed=0)
    out = model(torch.zeros(5, *shape))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", INPUT_SHAPES)
def test_deep_cnn_skips_pooling_on_tiny_maps(shape: tuple[int, ...]) -> None:
    cfg = _cfg(ModelName.cnn, channels=[4, 8, 8, 16, 16, 16], norm_groups=4, dropout=0.2)
    model = build_model(cfg, shape, num_classes=3, seed=0)
    assert model(torch.randn(2, *shape)).shape == (2, 3)


def test_mlp_layers_and_parameter_count() -> None:
    model = build_model(_cfg(ModelName.mlp, hidden=[64]), (1, 8, 8), 10)
    assert isinstance(model, MLP)
    assert count_parameters(model) == 64 * 64 + 64 + 64 * 10 + 10
    linear = build_model(_cfg(ModelName.mlp, hidden=[]), (1, 8, 8), 10)
    assert count_parameters(linear) == 64 * 10 + 10
    with_dropout = build_model(_cfg(ModelName.mlp, hidden=[8, 8], dropout=0.5), (4,), 2)
    assert sum(isinstance(m, nn.Dropout) for m in with_dropout.modules()) == 2


def test_count_parameters_trainable_only() -> None:
    model = build_model(_cfg(ModelName.mlp, hidden=[4]), (3,), 2)
    total = count_parameters(model)
    model.net[1].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - 12
    assert count_parameters(model) == total


@pytest.mark.parametrize("name", [ModelName.mlp, ModelName.cnn])
def test_no_batchnorm_and_opacus_compatible(name: ModelName) -> None:
    for shape in INPUT_SHAPES:
        model = build_model(_cfg(name, dropout=0.1), shape, 10, seed=0)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert opacus_incompatibilities(model) == []
        check_opacus_compatible(model)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("name", [ModelName.mlp, ModelName.cnn])
def test_opacus_computes_per_sample_gradients(name: ModelName) -> None:
    model = build_model(_cfg(name), (1, 8, 8), 10, seed=0)
    gsm = GradSampleModule(model)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(gsm(x), torch.tensor([0, 1, 2])).backward()
    for p in model.parameters():
        assert p.grad_sample is not None
        assert p.grad_sample.shape == (3, *p.shape)


def test_batchnorm_is_named() -> None:
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("head", nn.Linear(4, 2))
    problems = opacus_incompatibilities(model)
    assert len(problems) == 1
    assert "features.1" in problems[0] and "BatchNorm2d" in problems[0]
    with pytest.raises(ValueError, match=r"features\.1"):
        check_opacus_compatible(model)


def test_eval_mode_is_reported() -> None:
    model = build_model(_cfg(ModelName.mlp), (1, 8, 8), 10).eval()
    assert any("training mode" in p for p in opacus_incompatibilities(model))


def test_norm_groups_must_divide_channels() -> None:
    with pytest.raises(ValueError, match=r"model\.norm_groups"):
        build_model(_cfg(ModelName.cnn, channels=[8, 6], norm_groups=4), (1, 8, 8), 10)
    # Fewer channels than groups: one group per channel.
    model = build_model(_cfg(ModelName.cnn, channels=[2, 8], norm_groups=4), (1, 8, 8), 10)
    groups = [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups == [2, 4]


def test_invalid_configs_raise() -> None:
    with pytest.raises(ValueError, match=r"model\.name"):
        build_model(_cfg("resnet"), (1, 8, 8), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model\.dropout"):
        build_model(_cfg(ModelName.mlp, dropout=1.0), (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"model\.hidden\[1\]"):
        build_model(_cfg(ModelName.mlp, hidden=[4, 0]), (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"model\.channels"):
        build_model(_cfg(ModelName.cnn, channels=[]), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model(_cfg(ModelName.cnn), (64,), 10)


def test_registry_by_name_and_string() -> None:
    assert set(MODEL_REGISTRY) == set(ModelName)
    with pytest.raises(TypeError):
        MODEL_REGISTRY[ModelName.mlp] = MLP  # type: ignore[index]
    assert isinstance(build_model(_cfg("cnn"), (1, 8, 8), 10), SmallCNN)  # type: ignore[arg-type]


def test_seeded_build_is_deterministic_and_leaves_global_rng() -> None:
    before = torch.get_rng_state()
    a = build_model(_cfg(ModelName.cnn), (1, 8, 8), 10, seed=7)
    b = build_model(_cfg(ModelName.cnn), (1, 8, 8), 10, seed=7)
    c = build_model(_cfg(ModelName.cnn), (1, 8, 8), 10, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
