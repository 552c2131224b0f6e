"""Ghost norms for Conv2d/GroupNorm/LayerNorm and the book-keeping ghost step
(fl_app/privacy/ghost_norms.py) against references computed here.

* Per-sample gradient norms, layer by layer, against a brute-force loop: one backward
  pass per example on the plain model (no Opacus), norms of those gradients.
* Clipped sums (noise 0) against ``sum_i min(1, C / (||g_i|| + 1e-6)) g_i / B`` from
  the same brute-force gradients, and clipped + noised gradients (seeded noise
  generator) equal to hooks mode's, on every model of the DP-SGD benchmark
  (``scripts/bench_dpsgd.py``: both Conv2d paths, GroupNorm, Linear) and on models
  with LayerNorm, a strided/dilated/grouped Conv2d and an Embedding (second pass).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fl_app.config.schema import ClientTrainConfig, ModelConfig, ModelName
from fl_app.models import build_model
from fl_app.privacy import dpsgd_opacus
from fl_app.privacy.dpsgd_settings import (
    DpSgdSettings,
    ghost_clipping_layers,
    resolve_grad_sample_mode,
)
from fl_app.privacy.ghost_norms import (
    PER_SAMPLE_ENTRY_COST,
    conv2d_uses_ghost_norm,
    ghost_backward,
    needs_second_pass,
)


class _TokenModel(nn.Module):
    """Embedding -> LayerNorm -> mean over tokens -> Linear (integer inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(x)).mean(dim=1))


def _odd_convs() -> nn.Module:
    # Strided + dilated conv (Gram trick: 16^2 (32+27) = 15,104 < 76*32*27 = 65,664),
    # LayerNorm over the channel/space block, a grouped conv (per-sample gradient
    # fallback), a bias-free conv (Gram trick: 9^2 (16+32) = 3,888 < 76*16*32 = 38,912).
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, stride=2, dilation=2, padding=2),
        nn.LayerNorm([32, 4, 4]),
        nn.Conv2d(32, 8, kernel_size=3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=2, bias=False),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 10),
    )


def _bench_model(i: int) -> tuple[nn.Module, torch.Size]:
    # The four models of scripts/bench_dpsgd.py, same configs and input shapes.
    cfgs = [
        (ModelConfig(name=ModelName.mlp, hidden=[64]), (1, 8, 8)),
        (ModelConfig(name=ModelName.mlp, hidden=[256, 256]), (1, 28, 28)),
        (ModelConfig(name=ModelName.cnn, channels=[16, 32]), (1, 28, 28)),
        (ModelConfig(name=ModelName.cnn, channels=[100, 200, 400], norm_groups=4), (3, 32, 32)),
    ]
    cfg, shape = cfgs[i]
    return build_model(cfg, shape, 10, seed=0), torch.Size(shape)


def _case(i: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    if i < 4:
        model, shape = _bench_model(i)
        x = torch.rand((5, *shape), generator=g)
    elif i == 4:
        model, x = _odd_convs(), torch.rand((5, 3, 8, 8), generator=g)
    else:
        torch.manual_seed(0)
        model, x = _TokenModel(), torch.randint(0, 11, (5, 7), generator=g)
    return model, x, torch.randint(0, 10, (5,), generator=g)


CASES = range(6)


def _per_sample_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Brute force: one forward/backward pass per example on the plain model."""
    out = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def _trainer(model: nn.Module, x, y, mode: str, *, z: float, c: float, seed: int = 0):
    cfg = ClientTrainConfig(local_epochs=1, batch_size=len(y), lr=0.0, momentum=0.0)
    dp = DpSgdSettings(z, c, grad_sample_mode=mode, secure_mode=False)
    with dpsgd_opacus._expected_opacus_warnings():
        return dpsgd_opacus._PrivateTrainer(
            model, x, y, cfg, dp, mode,
            sampling_generator=torch.Generator().manual_seed(seed),
            noise_generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip


def _total_norms(grads: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat([t.flatten() for t in g]).norm() for g in grads])


@pytest.mark.parametrize("i", CASES)
def test_ghost_step_matches_brute_force_and_hooks_mode(i: int) -> None:
    """Per mode, one trainer (lr = 0, so the model never moves) takes two steps on the
    same batch: noise 0, then noise multiplier 1 from the seeded generator.

    * ghost's per-parameter and total per-sample norms = the brute-force loop's;
    * noise 0: both modes' gradient = ``sum_i min(1, C / (||g_i|| + 1e-6)) g_i / B``
      from the brute-force gradients, ``C`` their median norm (some examples clip,
      some do not);
    * noise 1: ghost's noised gradient = hooks' (same seeded generator, same draws).
    """
    model, x, y = _case(i)
    grads = _per_sample_grads(copy.deepcopy(model), x, y)
    norms = _total_norms(grads)
    c = float(norms.median())
    coef = [min(1.0, c / (float(n) + 1e-6)) for n in norms]
    assert 0 < sum(k < 1 for k in coef) < len(coef)
    n_params = len(grads[0])
    expected = [sum(coef[j] * grads[j][k] for j in range(len(y))) / len(y) for k in range(n_params)]
    clipped: dict[str, list[torch.Tensor]] = {}
    noised: dict[str, list[torch.Tensor]] = {}
    for mode in ("hooks", "ghost"):
        m = copy.deepcopy(model)
        trainer = _trainer(m, x, y, mode, z=0.0, c=c, seed=3)
        try:
            with dpsgd_opacus._expected_opacus_warnings():
                trainer.step(x, y)
                clipped[mode] = [p.grad.detach().clone() for p in m.parameters()]
                if mode == "ghost":
                    for k, p in enumerate(m.parameters()):
                        per_param = torch.stack([g[k].norm() for g in grads])
                        torch.testing.assert_close(p._norm_sample, per_param, rtol=1e-4, atol=1e-6)
                    total = trainer.hooks.get_norm_sample()
                    torch.testing.assert_close(total, norms, rtol=1e-4, atol=1e-6)
                trainer.optimizer.noise_multiplier = 1.0
                trainer.step(x, y)
                noised[mode] = [p.grad.detach().clone() for p in m.parameters()]
        finally:
            trainer.close()
    for k, e in enumerate(expected):
        atol = 1e-5 * (float(e.abs().max()) + 1e-12)
        for mode in ("hooks", "ghost"):
            torch.testing.assert_close(clipped[mode][k], e, rtol=1e-4, atol=atol)
        torch.testing.assert_close(noised["ghost"][k], noised["hooks"][k], rtol=1e-4, atol=1e-6)
        assert not torch.equal(noised["ghost"][k], clipped["ghost"][k])  # noise was added


def test_mixed_rule_compares_t_squared_p_plus_d_with_76_p_d() -> None:
    assert PER_SAMPLE_ENTRY_COST == 76
    # Bench CNN: (T, p, d) = (1024, 100, 27), (256, 200, 900), (64, 400, 1800):
    # T^2 (p+d) = 108.0M, 72.1M, 8.19M against 76 p d = 205k, 13.7M, 54.7M.
    assert not conv2d_uses_ghost_norm(nn.Conv2d(3, 100, 3, padding=1), 1024)
    assert not conv2d_uses_ghost_norm(nn.Conv2d(100, 200, 3, padding=1), 256)
    assert conv2d_uses_ghost_norm(nn.Conv2d(200, 400, 3, padding=1), 64)
    # Boundary: p = d = 38: 76 p d = 109,744 = T^2 (p + d) at T = 38 (not below); T = 37 is.
    assert not conv2d_uses_ghost_norm(nn.Conv2d(38, 38, 1), 38)
    assert conv2d_uses_ghost_norm(nn.Conv2d(38, 38, 1), 37)
    # Grouped or string-padded convolutions take per-sample gradients.
    assert not conv2d_uses_ghost_norm(nn.Conv2d(4, 4, 3, groups=2), 1)
    assert not conv2d_uses_ghost_norm(nn.Conv2d(4, 4, 3, padding="same"), 1)


def test_auto_now_picks_ghost_for_the_cnns() -> None:
    cnn, _ = _bench_model(3)
    norm_sampled, fallback = ghost_clipping_layers(cnn)
    assert fallback == [] and "features.0" in norm_sampled and "features.1" in norm_sampled
    assert resolve_grad_sample_mode(cnn, "auto", batch_size=128) == "ghost"
    assert not needs_second_pass(cnn)
    assert needs_second_pass(_TokenModel())  # Embedding: Opacus' norm, no clipped sum


def test_no_second_pass_refuses_a_parameter_without_clipped_sum() -> None:
    model, x, y = _case(5)
    trainer = _trainer(model, x, y, "ghost", z=0.0, c=1.0)
    try:
        logits = model(x)
        per_sample = nn.functional.cross_entropy(logits, y, reduction="none")
        with pytest.raises(RuntimeError, match="1 parameter\\(s\\) have no book-kept clipped sum"):
            ghost_backward(trainer.hooks, trainer.params, per_sample, [], second_pass=False)
    finally:
        trainer.close()


def _padding_mode_convs() -> nn.Module:
    # Every Conv2d pads its input itself (padding_mode != "zeros"), on each path:
    # reflect with an asymmetric kernel/padding, materialised (T = 64:
    # 64^2 (8+45) = 217,088 >= 76*8*45 = 27,360); replicate + grouped and circular +
    # "same" (Opacus' per-sample fallback); circular + stride 2, Gram trick
    # (16^2 (32+72) = 26,624 < 76*32*72 = 175,104).
    return nn.Sequential(
        nn.Conv2d(3, 8, (3, 5), padding=(1, 2), padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="replicate"),
        nn.Conv2d(8, 8, 3, padding="same", padding_mode="circular"),
        nn.Conv2d(8, 32, 3, stride=2, padding=1, padding_mode="circular"),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def test_ghost_step_on_self_padded_convs_equals_the_brute_force_clipped_gradient() -> None:
    """Review finding: circular/reflect/replicate convolutions were unfolded with zero
    padding, so norms and clipped sums were a zero-padded conv's (1-8 % off). Per-parameter
    norms, total norms and the noise-0 clipped gradient against the brute-force loop."""
    torch.manual_seed(0)
    model = _padding_mode_convs()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand((4, 3, 8, 8), generator=g), torch.randint(0, 10, (4,), generator=g)
    grads = _per_sample_grads(copy.deepcopy(model), x, y)
    norms = _total_norms(grads)
    c = float(norms.median())
    coef = [min(1.0, c / (float(n) + 1e-6)) for n in norms]
    assert 0 < sum(k < 1 for k in coef) < len(coef)
    trainer = _trainer(model, x, y, "ghost", z=0.0, c=c)
    try:
        with dpsgd_opacus._expected_opacus_warnings():
            trainer.step(x, y)
        for k, p in enumerate(model.parameters()):
            per_param = torch.stack([gr[k].norm() for gr in grads])
            torch.testing.assert_close(p._norm_sample, per_param, rtol=1e-4, atol=1e-6)
            e = sum(coef[j] * grads[j][k] for j in range(len(y))) / len(y)
            atol = 1e-5 * (float(e.abs().max()) + 1e-12)
            torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=atol)
        torch.testing.assert_close(trainer.hooks.get_norm_sample(), norms, rtol=1e-4, atol=1e-6)
    finally:
        trainer.close()
