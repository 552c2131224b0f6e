"""Red-team review of the features since 7d9641c (issues 19-22), as the parties they
protect against (the threat models of docs/architecture.md; docs/compression.md,
docs/dp-ftrl.md, fl_app/privacy/ghost_norms.py).

Each test states a property the review found broken; a finding still open is a strict
xfail (it fails on today's code and starts passing, so the xfail must go, once fixed).
Expected values are worked out here (a brute-force per-example loop, the DP-FTRL
prefix-sum algebra), never taken from the code under test.
"""

from __future__ import annotations

import pytest

from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError


def test_dp_ftrl_with_random_k_is_refused_before_the_run() -> None:
    with pytest.raises(ConfigError, match=r"share\.compression"):
        compose_config("config", ["privacy=ftrl", "share=randk"])



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


def test_under_random_k_dp_ftrl_node_noises_would_not_cancel() -> None:
    """Why the refusal above exists: with a per-round mask, round 1's leaf noise (1.0)
    stays on the coordinates round 2 does not send, where the tree promises only the
    level-1 node's noise (0 on coordinates round 2 did not touch)."""
    import numpy as np

    got, tree_promise = _dp_ftrl_randk_model_noise()
    np.testing.assert_array_equal(got, np.ones_like(got))
    assert not np.array_equal(got, tree_promise)
