"""Model card statements that must match what the code does (claims audit items 3, 4, 6, 7).

Guarantees tested, each against the code path the statement describes:

* the Markdown card shows distributed DP's epsilon against the server, not only the
  outsider epsilon (the JSON card's nested ``epsilon_against_server``);
* distributed DP's ``noise_source`` never says "seeded": its shares and rounding come
  from SecureNoise in each client whatever ``privacy.secure_mode`` is;
* DP-SGD under secure aggregation: neither the threat model nor the not-protected
  list says the server saw each institution's update (it saw the masked sum);
* no DP, or DP-SGD, under secure aggregation: no statement that the server saw each
  update; a deployed site's public site hash is named;
* DP-SGD without secure aggregation: the card names what a DP-SGD client sends in
  plaintext (the ``dp-*`` metrics and example count) and does not say it sent
  training metrics, which it leaves out.

Three one-round in-process runs (about 3 s together) are exported, and their cards are
checked against what crossed the wire; unit tests over composed configs cover the
other branches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from fl_app.client.app import app as client_app
from fl_app.config.compose import compose_config
from fl_app.config.guarantee import threat_model_text
from fl_app.release import export_run, render_card_markdown
from fl_app.release.card import client_level_noise_source
from fl_app.release.caveats import not_protected
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import run_experiment


def _cfg(*overrides: str) -> Any:
    return compose_config("config", ["runtime=inprocess", *overrides])


class Exported:
    """An exported run's card (JSON and Markdown) and the plaintext metric keys its
    clients sent."""

    def __init__(self, out: Path, summary: dict[str, Any], keys: set[str]) -> None:
        self.card = json.loads((out / "model_card.json").read_text())
        self.md = (out / "model_card.md").read_text()
        self.summary = summary
        self.keys = keys


def _export(base: Path, name: str, *overrides: str) -> Exported:
    cfg = _cfg("dataset.num_partitions=3", "num_rounds=1", "train.local_epochs=1", *overrides)
    keys: set[str] = set()

    def hook(node: int, reply: Message) -> Message:
        if reply.has_content():
            for record in reply.content.metric_records.values():
                keys.update(record)
        return reply

    with InProcessGrid(
        client_app, cfg.dataset.num_partitions, seed=cfg.seed, message_hook=hook
    ) as grid:
        summary = run_experiment(grid, cfg, base / name, progress=False)
    out = export_run(base / name, "public", base / f"{name}-out").out_dir
    return Exported(out, summary, keys)


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    base = tmp_path_factory.mktemp("card-claims")
    return {
        "ddp": _export(
            base,
            "ddp",
            "privacy=distributed",
            "secagg=secaggplus",
            "privacy.secure_mode=false",
            "dataset.num_partitions=4",
        ),
        "dpsgd": _export(base, "dpsgd", "privacy=dpsgd", "secagg=off"),
        "dpsgd_secagg": _export(
            base, "dpsgd_secagg", "privacy=dpsgd", "secagg=secaggplus", "secagg.clip=10.0"
        ),
    }


# ---- item 3: epsilon against the server in the Markdown card ------------------------


def _card(client_level: dict[str, Any]) -> dict[str, Any]:
    section = {"field": "value"}
    return {
        "tier": "public",
        "task": section,
        "data": section,
        "model": section,
        "training": section,
        "evaluation": section,
        "privacy": {
            "differential_privacy": True,
            "guarantee": "g",
            "client_level": client_level,
            "record_level_dp": None,
        },
        "not_protected": [],
        "reproducibility": section,
    }


def test_markdown_card_shows_the_epsilon_against_the_server() -> None:
    md = render_card_markdown(
        _card(
            {
                "epsilon": 4.77,
                "epsilon_is": "against outsiders",
                "epsilon_against_server": {
                    "epsilon_max_over_clients": 29.1,
                    "rounds_max_over_clients": 12,
                    "note": "no amplification | the server knows the cohorts",
                },
            }
        )
    )
    lines = md.splitlines()
    assert "| epsilon | 4.77 |" in lines
    assert "| epsilon_against_server.epsilon_max_over_clients | 29.1 |" in lines
    assert "| epsilon_against_server.rounds_max_over_clients | 12 |" in lines
    # a '|' in a value must not split the Markdown row
    assert (
        "| epsilon_against_server.note | no amplification / the server knows the cohorts |" in lines
    )


# ---- item 4: distributed DP's noise is never seeded ----------------------------------


@pytest.mark.parametrize("secure_mode", ["true", "false"])
def test_distributed_dp_noise_source_is_the_clients_csprng(secure_mode: str) -> None:
    cfg = _cfg("privacy=distributed", "secagg=secaggplus", f"privacy.secure_mode={secure_mode}")
    source = client_level_noise_source(cfg)
    assert "seeded" not in source
    assert "CSPRNG in each client" in source
    assert not any("seeded" in item for item in not_protected(cfg))


def test_central_dp_noise_source_still_follows_secure_mode() -> None:
    assert "seeded" in client_level_noise_source(
        _cfg("privacy=central", "privacy.secure_mode=false")
    )
    assert "seeded" not in client_level_noise_source(
        _cfg("privacy=central", "privacy.secure_mode=true")
    )


# ---- item 6: DP-SGD under secure aggregation ----------------------------------------


def test_dpsgd_with_secagg_card_says_the_server_saw_only_the_masked_sum() -> None:
    cfg = _cfg("privacy=dpsgd", "secagg=secaggplus", "secagg.clip=10.0")
    threat = threat_model_text(cfg)
    assert "every institution's update" not in threat
    assert "masked sum" in threat
    items = not_protected(cfg)
    assert not any("saw each institution's whole" in item for item in items)
    assert any("only the exact sum" in item for item in items)


def test_dpsgd_without_secagg_card_still_says_the_server_saw_each_update() -> None:
    cfg = _cfg("privacy=dpsgd", "secagg=off")
    assert "every institution's update" in threat_model_text(cfg)
    assert any("saw each institution's whole" in item for item in not_protected(cfg))


# ---- item 7: what a DP-SGD client sends in the clear --------------------------------


def test_dpsgd_without_secagg_card_names_the_plaintext_dp_metrics() -> None:
    cfg = _cfg("privacy=dpsgd", "secagg=off")
    items = not_protected(cfg)
    sent = [item for item in items if "in plaintext" in item]
    assert len(sent) == 1, items
    text = sent[0]
    # fl_app.client.dp_stages.prepare_dpsgd's reply: dp-epsilon, dp-delta, dp-steps, dp-rounds,
    # dp-sample-rate, dp-noise-multiplier, dp-partition-id, dp-site-hash, num-examples.
    for named in (
        "example count",
        "partition id",
        "epsilon",
        "delta",
        "steps",
        "rounds trained",
        "sample rate",
        "noise multiplier",
        "hash of its site identity",
    ):
        assert named in text, named
    assert "record count" in text
    assert not any("training metrics" in item for item in items)
    assert not any("training loss" in item for item in items)


def test_central_dp_without_secagg_card_names_training_and_evaluation_replies() -> None:
    cfg = _cfg("privacy=central", "secagg=off")
    items = not_protected(cfg)
    (sent,) = [item for item in items if "in the clear" in item and "example count" in item]
    assert "training loss and accuracy" in sent
    assert "federated evaluation loss, accuracy and example count" in sent


# ---- the same claims on exported runs ----------------------------------------------


def test_exported_markdown_card_shows_distributed_dp_epsilon_against_the_server(
    cards: dict[str, Exported],
) -> None:
    c = cards["ddp"]
    against = c.summary["privacy"]["client_level"]["against_server"]
    assert (
        c.card["privacy"]["client_level"]["epsilon_against_server"]["epsilon_max_over_clients"]
        == against["epsilon_max_over_clients"]
    )
    lines = c.md.splitlines()
    row = (
        "| epsilon_against_server.epsilon_max_over_clients | "
        f"{against['epsilon_max_over_clients']:.6g} |"
    )
    assert row in lines


def test_exported_distributed_dp_card_with_secure_mode_false_says_no_seeded_noise(
    cards: dict[str, Exported],
) -> None:
    c = cards["ddp"]
    assert c.card["privacy"]["client_level"]["noise_source"].startswith("CSPRNG in each client")
    assert "seeded" not in c.md


def test_exported_dpsgd_secagg_card_does_not_say_the_server_saw_each_update(
    cards: dict[str, Exported],
) -> None:
    c = cards["dpsgd_secagg"]
    assert "every institution's update" not in c.card["privacy"]["threat_model_description"]
    assert "masked sum" in c.card["privacy"]["threat_model_description"]
    assert not any("saw each institution's whole" in x for x in c.card["not_protected"])
    # a deployed site's dp-site-hash is forwarded in the clear beside the masked vector
    (public,) = [x for x in c.card["not_protected"] if "in plaintext only" in x]
    assert "hash of its site identity" in public


# What each plaintext key a DP-SGD client sends is called on the card.
_CARD_NAME = {
    "num-examples": "example count",
    "dp-epsilon": "record-level epsilon",
    "dp-delta": "delta",
    "dp-steps": "DP-SGD steps",
    "dp-rounds": "rounds trained",
    "dp-sample-rate": "sample rate",
    "dp-noise-multiplier": "noise multiplier",
    "dp-partition-id": "partition id",
    "dp-site-hash": "hash of its site identity",
}
_PROTOCOL_KEYS = {"server-round"}


def test_exported_dpsgd_card_names_every_plaintext_metric_its_clients_sent(
    cards: dict[str, Exported],
) -> None:
    c = cards["dpsgd"]
    sent = c.keys - _PROTOCOL_KEYS
    assert "train-loss" not in sent and "train-accuracy" not in sent
    assert {"num-examples", "dp-epsilon", "dp-steps", "dp-sample-rate"} <= sent
    assert sent <= set(_CARD_NAME), f"card does not name {sent - set(_CARD_NAME)}"
    (text,) = [x for x in c.card["not_protected"] if "in plaintext" in x]
    for key in sent:
        assert _CARD_NAME[key] in text, key
    assert not any("training metrics" in x or "training loss" in x for x in c.card["not_protected"])


def test_no_dp_secagg_card_does_not_say_the_server_saw_each_update() -> None:
    cfg = _cfg("privacy=none", "secagg=secaggplus", "secagg.clip=10.0")
    assert "in the clear" not in threat_model_text(cfg)
    items = not_protected(cfg)
    assert not any("every client's update" in x for x in items)
    assert any("exact sum" in x for x in items)
    # secure aggregation turns federated evaluation off by default
    assert not any("federated evaluation" in x for x in items)
    plain = _cfg("privacy=none", "secagg=off")
    assert "in the clear" in threat_model_text(plain)
    assert any("every client's update in the clear" in x for x in not_protected(plain))
