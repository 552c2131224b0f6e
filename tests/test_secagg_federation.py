"""Red-team pass 3 on the malicious server model, each break through the real client.

B1: a site with a signing key and roster (set up for a server it does not trust) and no
policy file answered a plain train (raw update) and a federated evaluation (per-client
metrics): the malicious floor was applied only at the key stages. Now one effective
policy serves every handler.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_app.client_app import app as client_app
from fl_app.client_spec import encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.protocol import CONFIG_KEY, SERVER_ROUND, SPEC_KEY
from fl_app.server_app import initial_arrays
from fl_app.weights import to_array_record


def _identity_site(tmp_path: Path, policy: str | None) -> Iterator[Context]:
    """A deployed site's context (key, roster, site-name, optional policy file), inside
    an in-process grid (which sets Flower's task identity for Message)."""
    from fl_app.deploy import create_signing_key, write_roster
    from fl_app.testing import InProcessGrid

    _, pub = create_signing_key(tmp_path, "site0")
    roster = write_roster(tmp_path / "roster.json", {"site0": pub})
    node_config: dict[str, Any] = {
        "partition-id": 0,
        "num-partitions": 1,
        "site-name": "site0",
        "signing-key-path": str(tmp_path / "site0.sign"),
        "roster-path": str(roster),
    }
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(policy, encoding="utf-8")
        node_config["policy-path"] = str(tmp_path / "policy.yaml")
    grid = InProcessGrid(client_app, 1, seed=0, node_config_fn=lambda i, n: node_config)
    try:
        yield grid.context(grid.node_ids[0])
    finally:
        grid.close()


def _plain(context: Context, message_type: str) -> Message:
    cfg = compose_config("config", ["runtime=inprocess", "secagg=off", "dataset.num_partitions=3"])
    config = {SPEC_KEY: encode_spec(spec_from_config(cfg, run_key="fresh-run")), SERVER_ROUND: 1}
    content = RecordDict(
        {"arrays": to_array_record(initial_arrays(cfg)), CONFIG_KEY: ConfigRecord(config)}
    )
    msg = Message(content, dst_node_id=context.node_id, message_type=message_type)
    return client_app(msg, context)


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_a_roster_site_without_a_policy_refuses_plain_instructions(
    tmp_path: Path, message_type: str
) -> None:
    for context in _identity_site(tmp_path, None):
        reply = _plain(context, message_type)
        assert reply.has_error(), "a roster site answered a plain instruction"
        assert "site policy `require_secure_aggregation`" in reply.error.reason
    # The same holds when the policy file exists but does not name the field.
    (tmp_path / "other").mkdir()
    for context in _identity_site(tmp_path / "other", "allow_seeded_noise: true\n"):
        reply = _plain(context, message_type)
        assert reply.has_error() and "`require_secure_aggregation`" in reply.error.reason


def test_a_roster_site_that_opts_out_explicitly_is_not_refused_for_it(tmp_path: Path) -> None:
    # Control: the refusal comes from the identity floor, not from the instruction.
    for context in _identity_site(tmp_path, "require_secure_aggregation: false\n"):
        reply = _plain(context, "evaluate")
        assert not reply.has_error() or "require_secure_aggregation" not in reply.error.reason
