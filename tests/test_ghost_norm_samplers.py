"""The norm samplers of fl_app/privacy/ghost_norms.py, layer by layer, on tiny layers
(fast: no Opacus trainer; the mutation-testing selection for that module).

For a layer ``f`` with input ``a`` and an upstream gradient ``R``, example ``i``'s
per-sample gradient is that of ``<f(a_i), R_i>`` with respect to the parameters,
computed here by one autograd call per example. Each sampler's norms must be those
gradients' norms, and (inside ``bookkeeping()``) the function it leaves on a parameter
must return ``sum_i c_i g_i`` for any coefficients ``c``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_app.privacy import ghost_norms as gn


def _layer(i: int) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(i)
    layers: list[tuple[nn.Module, tuple[int, ...]]] = [
        # 0: Gram trick (T = 16: 16^2 (6+18) = 6,144 < 76*6*18 = 8,208), dilated.
        (nn.Conv2d(2, 6, 3, stride=2, padding=2, dilation=2), (2, 8, 8)),
        # 1: materialised (T = 36: 36^2 (3+8) = 14,256 >= 76*3*8 = 1,824), no padding.
        (nn.Conv2d(2, 3, 2, dilation=2), (2, 8, 8)),
        # 2: Gram trick, circular padding, asymmetric (T = 16: 256 (6+30) < 76*6*30).
        (nn.Conv2d(2, 6, (3, 5), stride=2, padding=(1, 2), padding_mode="circular"), (2, 8, 8)),
        # 3: materialised, reflect padding (T = 64).
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 8, 8)),
        # 4: grouped + replicate (Opacus' fallback on the padded input).
        (nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="replicate"), (4, 5, 5)),
        # 5: grouped, zero padding (Opacus' fallback as is).
        (nn.Conv2d(4, 2, 3, padding=1, groups=2, bias=False), (4, 5, 5)),
        # 6: "same" string padding, circular.
        (nn.Conv2d(2, 3, 3, padding="same", padding_mode="circular"), (2, 5, 5)),
        (nn.GroupNorm(2, 4), (4, 3, 3)),  # 7
        (nn.LayerNorm([3, 4]), (2, 3, 4)),  # 8
        (nn.Linear(5, 3), (4, 5)),  # 9: sequence input (per-sample sums over tokens)
        (nn.Linear(5, 3, bias=False), (5,)),  # 10
    ]
    return layers[i]


CASES = range(11)


def _brute_force(layer: nn.Module, a: torch.Tensor, r: torch.Tensor) -> list[list[torch.Tensor]]:
    params = list(layer.parameters())
    out = []
    for i in range(len(a)):
        loss = (layer(a[i : i + 1]) * r[i : i + 1]).sum()
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return out


def _sampler(layer: nn.Module):
    return {
        nn.Conv2d: gn.compute_conv2d_norm_sample,
        nn.GroupNorm: gn.compute_group_norm_norm_sample,
        nn.LayerNorm: gn.compute_layer_norm_norm_sample,
        nn.Linear: gn.compute_linear_norm_sample_kept,
    }[type(layer)]


@pytest.mark.parametrize("i", CASES)
def test_sampler_norms_and_clipped_sums_equal_the_per_example_loop(i: int) -> None:
    layer, shape = _layer(i)
    g = torch.Generator().manual_seed(10 + i)
    a = torch.randn((3, *shape), generator=g)
    with torch.no_grad():
        out_shape = layer(a).shape
    r = torch.randn(out_shape, generator=g)
    expected = _brute_force(layer, a, r)
    c = torch.tensor([0.25, 1.0, -0.5], dtype=torch.float64)  # cast to the layer's dtype
    with gn.bookkeeping():
        norms = _sampler(layer)(layer, [a], r)
    assert list(norms) == list(layer.parameters())
    if i < 4:  # the path the comments above work out
        t = out_shape[2] * out_shape[3]
        assert gn.conv2d_uses_ghost_norm(layer, t) == (i in (0, 2))
    for k, p in enumerate(layer.parameters()):
        per_example = torch.stack([e[k].norm() for e in expected])
        torch.testing.assert_close(norms[p], per_example, rtol=1e-4, atol=1e-6)
        fn = p.__dict__.pop(gn.CLIPPED_SUM_ATTR)
        want = sum(float(c[j]) * expected[j][k] for j in range(3))
        torch.testing.assert_close(fn(c).view_as(p), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("i", [0, 3, 8])
def test_chunked_and_small_norms_equal_the_per_example_loop(
    i: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One example per chunk (``_CHUNK_ELEMENTS`` = 1), and upstream gradients so small
    that every squared norm is below 1 (a clamp other than at 0 would show)."""
    monkeypatch.setattr(gn, "_CHUNK_ELEMENTS", 1)
    layer, shape = _layer(i)
    g = torch.Generator().manual_seed(20 + i)
    a = torch.randn((3, *shape), generator=g)
    with torch.no_grad():
        r = 1e-3 * torch.randn(layer(a).shape, generator=g)
    expected = _brute_force(layer, a, r)
    c = torch.tensor([1.0, 0.5, 2.0])
    with gn.bookkeeping():
        norms = _sampler(layer)(layer, [a], r)
    for k, p in enumerate(layer.parameters()):
        per_example = torch.stack([e[k].norm() for e in expected])
        assert float(per_example.max()) < 1.0
        torch.testing.assert_close(norms[p], per_example, rtol=1e-4, atol=1e-9)
        fn = p.__dict__.pop(gn.CLIPPED_SUM_ATTR)
        want = sum(float(c[j]) * expected[j][k] for j in range(3))
        torch.testing.assert_close(fn(c).view_as(p), want, rtol=1e-4, atol=1e-9)


def test_mixed_rule_counts_both_kernel_dimensions() -> None:
    # (38, 1) kernel on 1 channel: d = 38 = p, so the boundary of the 38 x 38 case:
    # T = 37: 37^2 * 76 = 104,044 < 76 * 38 * 38 = 109,744 (Gram trick), T = 38 not.
    assert gn.conv2d_uses_ghost_norm(nn.Conv2d(1, 38, (38, 1)), 37)
    assert not gn.conv2d_uses_ghost_norm(nn.Conv2d(1, 38, (38, 1)), 38)
    assert gn.conv2d_uses_ghost_norm(nn.Conv2d(1, 38, (1, 38)), 37)


def test_outside_bookkeeping_no_clipped_sum_is_left() -> None:
    layer, shape = _layer(0)
    a = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    r = torch.ones_like(layer(a))
    gn.compute_conv2d_norm_sample(layer, [a], r)
    assert all(not hasattr(p, gn.CLIPPED_SUM_ATTR) for p in layer.parameters())


def test_frozen_parameters_get_no_norm_nor_clipped_sum() -> None:
    layer, shape = _layer(0)
    layer.weight.requires_grad_(False)
    a = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    r = torch.ones((2, 6, 4, 4))
    with gn.bookkeeping():
        norms = gn.compute_conv2d_norm_sample(layer, [a], r)
    assert list(norms) == [layer.bias]
    assert not hasattr(layer.weight, gn.CLIPPED_SUM_ATTR)
    # bias gradient of <f(a_i), 1>: the number of output positions (16) per channel
    torch.testing.assert_close(norms[layer.bias], torch.full((2,), 16.0 * 6**0.5))


class _EmbeddingModel(nn.Module):
    """Embedding (no book-keeping: second pass) -> mean over tokens -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(dim=1))


def test_ghost_backward_default_second_pass_equals_the_per_example_loop() -> None:
    """Default ``second_pass`` (True) and no targets: every ``p.grad`` is
    ``sum_i c_i g_i`` with ``g_i`` example ``i``'s gradient of its own loss and
    ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus' formula); with
    ``second_pass=False`` the refusal names the fix."""
    from fl_app.config.schema import ClientTrainConfig
    from fl_app.privacy import dpsgd_opacus
    from fl_app.privacy.dpsgd_settings import DpSgdSettings

    model = _EmbeddingModel()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 7, (4, 3), generator=g), torch.randint(0, 3, (4,), generator=g)
    params = list(model.parameters())
    per_example = []
    for i in range(4):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        per_example.append(torch.autograd.grad(loss, params))
    norms = torch.stack([torch.cat([t.flatten() for t in e]).norm() for e in per_example])
    c = float(norms.median())
    coef = [min(1.0, c / (float(n) + 1e-6)) for n in norms]
    cfg = ClientTrainConfig(local_epochs=1, batch_size=4, lr=0.0, momentum=0.0)
    dp = DpSgdSettings(0.0, c, grad_sample_mode="ghost", secure_mode=False)
    with dpsgd_opacus._expected_opacus_warnings():
        trainer = dpsgd_opacus._PrivateTrainer(
            model, x, y, cfg, dp, "ghost",
            sampling_generator=torch.Generator().manual_seed(0),
            noise_generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    try:
        for second_pass in (False, True):
            per_sample = nn.functional.cross_entropy(model(x), y, reduction="none")
            if not second_pass:
                with pytest.raises(RuntimeError) as err:
                    gn.ghost_backward(
                        trainer.hooks, trainer.params, per_sample, [], second_pass=False
                    )
                assert str(err.value) == (
                    "1 parameter(s) have no book-kept clipped sum; "
                    "call ghost_backward with second_pass=True for this model"
                )
                continue
            gn.ghost_backward(trainer.hooks, trainer.params, per_sample, [])
        for k, p in enumerate(params):
            want = sum(coef[j] * per_example[j][k] for j in range(4))
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
    finally:
        trainer.close()
