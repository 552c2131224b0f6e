"""Red-team review of the features since 7d9641c (issues 19-22), as the parties they
protect against (/work/shared/design/ARCHITECTURE.md §2a; docs/compression.md,
docs/dp-ftrl.md, fl_app/privacy/ghost_norms.py).

Each test states a property the review found broken, as a strict xfail: it fails on
today's code and starts passing (so the xfail must be removed) once the fix lands.
Expected values are worked out here (a brute-force per-example loop, the DP-FTRL
prefix-sum algebra), never taken from the code under test.
"""

from __future__ import annotations

import pytest

from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError
from fl_app.config.validate_privacy import check_privacy


@pytest.mark.xfail(
    strict=True,
    reason="review: privacy=ftrl with share=randk is accepted; the tree's prefix sums "
    "are formed over k-vectors whose coordinates change every round (a new public mask), "
    "so P~_t - P~_{t-1} is scattered onto round t's mask and the node noises no longer "
    "telescope: the model is not theta_0 + P~_t/m (noise grows like DP-FedAvg's, not "
    "log t). fl_app/config/validate_privacy.py _check_ftrl lacks a share.compression check",
)
def test_dp_ftrl_with_random_k_is_refused_before_the_run() -> None:
    cfg = compose_config("config", ["privacy=ftrl", "share=randk"])
    with pytest.raises(ConfigError, match=r"share\.compression"):
        check_privacy(cfg)


def _dp_ftrl_randk_model_noise() -> tuple[object, object]:
    """Two DP-FTRL rounds with zero true sums under random-k, by the algebra the release
    runs (strategies/ftrl.py TreeRelease + strategies/round_release.py _scattered).

    The tree's promise after round 2: P~_2 is ONE node (level 1, rounds [1, 2]) with one
    noise draw n_12; the model moves by P~_2/m. Round 1's leaf noise n_1 is dropped from
    every later prefix sum. Scattered with a per-round mask, round 1 released n_1 on
    mask_1 and round 2 released n_12 - n_1 on mask_2, so coordinates in mask_1 but not in
    mask_2 keep n_1 forever.
    """
    import numpy as np

    from fl_app.compression import RandK
    from fl_app.privacy.tree import TreeAggregator

    d, m = 40, 1.0
    comp = RandK(run_key="review-run", ratio=0.25)
    model = {"w": np.zeros(d, dtype=np.float64)}
    k = comp.wire_template(1, model)["compressed"].size
    draws = iter([np.full(k, 1.0), np.full(k, 10.0)])  # n_1 = 1, n_12 = 10 (scripted)
    tree = TreeAggregator(noise_std=1.0)
    theta = np.zeros(d)
    previous = None
    for rnd in (1, 2):
        prefix = tree.add({"compressed": np.zeros(k)}, lambda std, size: next(draws))
        step = prefix["compressed"] - (previous if previous is not None else 0.0)
        previous = prefix["compressed"]
        theta = theta + comp.decompress(rnd, {"compressed": step / m}, model)["w"]
    only_round_1 = np.setdiff1d(comp.coordinates(1, d), comp.coordinates(2, d))
    assert only_round_1.size > 0  # the two rounds' masks differ
    return theta[only_round_1], np.zeros(only_round_1.size)


@pytest.mark.xfail(
    strict=True,
    reason="review: under share=randk DP-FTRL's released node noises do not cancel "
    "(round 1's leaf noise stays on the coordinates round 2 does not send); the "
    "reproduction behind the refusal above (if the fix is that refusal, this stays xfail)",
)
def test_dp_ftrl_model_after_two_rounds_carries_only_the_level_1_node_noise() -> None:
    import numpy as np

    got, expected = _dp_ftrl_randk_model_noise()
    np.testing.assert_array_equal(got, expected)
