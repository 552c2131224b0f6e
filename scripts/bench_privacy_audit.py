"""Membership-inference TPR/AUC against ε on digits: non-private vs DP-SGD z=0.5, 1, 2.

Central, small models (64 members, 256 non-members, seeds as in
tests/test_privacy_audit.py); ε from the PRV accountant at δ=1e-5 for the target's own
DP-SGD steps. Prints one row per setting: ε, loss-threshold and LiRA-online AUC and
TPR at 0.1% / 1% FPR. Usage: ``.venv/bin/python scripts/bench_privacy_audit.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import load_digits

from fl_app.config.schema import ClientTrainConfig, ModelConfig
from fl_app.models import build_model
from fl_app.privacy.accounting import epsilon
from fl_app.privacy.dpsgd import train_dpsgd
from fl_app.privacy.dpsgd_settings import DpSgdSettings
from fl_app.privacy.history import DpSgdEvent, PrivacyHistory
from fl_app.privacy_audit.membership import (
    ShadowSettings,
    lira_attack,
    loss_threshold_attack,
    model_factory,
)
from fl_app.training import train_local

PLAIN = ClientTrainConfig(local_epochs=100, batch_size=16, lr=0.1, momentum=0.9)
DP_TRAIN = ClientTrainConfig(local_epochs=30, batch_size=16, lr=0.5, momentum=0.0)


def main() -> None:
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    m, n = perm[:64], perm[64 : 64 + 256]
    mem, non = (x[m], y[m]), (x[n], y[n])
    pool = (np.concatenate([mem[0], non[0]]), np.concatenate([mem[1], non[1]]))
    is_member = np.arange(len(pool[1])) < len(m)
    factory = model_factory(ModelConfig(hidden=[256]), (1, 8, 8), 10)
    print(
        "setting   epsilon  acc_test  loss_auc loss_tpr@0.1% loss_tpr@1%  lira_auc "
        "lira_tpr@0.1% lira_tpr@1%"
    )
    for z in (None, 0.5, 1.0, 2.0):
        model = build_model(ModelConfig(hidden=[256]), [1, 8, 8], 10, seed=0)
        gen = torch.Generator().manual_seed(0)
        dp = None if z is None else DpSgdSettings(noise_multiplier=z, max_grad_norm=1.0)
        if dp is None:
            train_local(model, *mem, PLAIN, generator=gen)
            eps = math.inf
        else:
            _, res = train_dpsgd(model, *mem, DP_TRAIN, dp, generator=gen)
            hist = PrivacyHistory().add(DpSgdEvent(dp.noise_multiplier, res.sample_rate, res.steps))
            eps = epsilon(hist, 1e-5, "prv")
        cfg = PLAIN if dp is None else DP_TRAIN
        loss = loss_threshold_attack(model, mem, non)
        lira = lira_attack(
            model,
            factory,
            pool,
            is_member,
            np.ones_like(is_member),
            ShadowSettings(8, cfg.local_epochs, cfg, dpsgd=dp, seed=0),
        ).online
        with torch.no_grad():
            acc = float((model(torch.from_numpy(non[0])).argmax(1).numpy() == non[1]).mean())
        name = "plain" if z is None else f"z={z}"
        print(
            f"{name:<9} {eps:7.2f}  {acc:8.3f}  {loss.auc:8.3f} {loss.tpr_at_fpr['0.001']:13.3f} "
            f"{loss.tpr_at_fpr['0.01']:11.3f}  {lira.auc:8.3f} {lira.tpr_at_fpr['0.001']:13.3f} "
            f"{lira.tpr_at_fpr['0.01']:11.3f}"
        )


if __name__ == "__main__":
    main()
