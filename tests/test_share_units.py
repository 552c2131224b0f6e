"""share.* units: the layer selection, the config checks and the site policy's share rules.

Expected values are written out by hand from the MLP's state_dict names for
``model.hidden=[64]`` (Flatten, Linear, ReLU, Linear: ``net.1.*`` and ``net.3.*``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_app.client.app import app as client_app
from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.client.policy_file import PolicyError, parse_policy
from fl_app.client_spec import decode_spec, encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError, ConfigError, ConfigRangeError
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import initial_arrays
from fl_app.share_layers import not_covered, shared_names, split_shared, unmatched_patterns
from fl_app.weights import to_array_record

NAMES = ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
COMMON = ["runtime=inprocess", "dataset.num_partitions=4", "num_rounds=1", "server_eval=false"]


def test_patterns_select_in_model_order() -> None:
    assert shared_names(NAMES, ["*"]) == NAMES
    assert shared_names(NAMES, ["net.3.*", "net.1.bias"]) == ["net.1.bias", *NAMES[2:]]
    assert shared_names(NAMES, ["net.1"]) == []  # a glob matches whole names
    assert shared_names(NAMES, ["NET.1.*"]) == []  # and is case-sensitive
    shared, kept = split_shared(dict.fromkeys(NAMES, 0), ["net.1.*"])
    assert list(shared) == NAMES[:2] and list(kept) == NAMES[2:]
    assert unmatched_patterns(NAMES, ["net.1.*", "head.*", "net.9*"]) == ["head.*", "net.9*"]
    assert not_covered(NAMES, ["net.1.*"]) == NAMES[2:]
    assert not_covered(NAMES[:2], ["net.1.*"]) == []


def test_default_shares_everything_and_the_spec_round_trips() -> None:
    cfg = compose_config("config", COMMON)
    assert cfg.share.artifact.value == "delta" and list(cfg.share.layers) == ["*"]
    assert list(initial_arrays(cfg)) == NAMES
    body = compose_config("config", [*COMMON, "share=body"])
    assert list(initial_arrays(body)) == NAMES[:2]
    spec = decode_spec(encode_spec(spec_from_config(body, "r")))
    assert list(spec.share.layers) == ["net.1.*"]


@pytest.mark.parametrize(
    ("overrides", "field", "kind", "words"),
    [
        (["share.layers=[head.*]"], "share.layers", ConfigRangeError, "match no parameter"),
        (["share.layers=[]"], "share.layers", ConfigRangeError, "at least one pattern"),
        (["share.artifact=compressed"], "share.artifact", ConfigConflictError, "compression"),
        (
            ["share.layers=[net.1.*]", "server_eval=true"],
            "server_eval",
            ConfigConflictError,
            "set server_eval=false",
        ),
        (
            ["share.artifact=weights", "privacy=central"],
            "share.artifact",
            ConfigConflictError,
            "privacy.mode=none",
        ),
        (
            ["share.artifact=weights", "secagg=secaggplus", "secagg.clip=5.0"],
            "share.artifact",
            ConfigConflictError,
            "secagg=off",
        ),
    ],
)
def test_bad_share_config_fails_before_the_run(
    overrides: list[str], field: str, kind: type[ConfigError], words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config("config", [*COMMON, *overrides])
    assert type(err.value) is kind
    assert err.value.field == field
    assert words in str(err.value)


def test_weights_artifact_allowed_on_a_trusted_plain_run() -> None:
    assert compose_config("config", [*COMMON, "share.artifact=weights"]).share.artifact.value == (
        "weights"
    )


def test_dp_dimension_counts_the_shared_layers_only() -> None:
    from fl_app.config.client_dp import model_dimension

    # 64 inputs x 64 hidden + 64, and the head 64 x 10 + 10.
    assert model_dimension(compose_config("config", COMMON)) == 64 * 64 + 64 + 64 * 10 + 10
    assert model_dimension(compose_config("config", [*COMMON, "share=body"])) == 64 * 64 + 64


def test_policy_share_rules() -> None:
    policy = SitePolicy(allowed_share_artifacts=frozenset({"delta"}), shareable_layers=("net.1.*",))
    policy.check_share("delta", NAMES[:2])
    with pytest.raises(PolicyViolation) as err:
        policy.check_share("weights", NAMES[:2])
    assert err.value.field == "allowed_share_artifacts"
    with pytest.raises(PolicyViolation) as err:
        policy.check_share("delta", NAMES)
    assert err.value.field == "shareable_layers"
    assert "net.3.weight" in err.value.message and "net.1.weight" not in err.value.message
    SitePolicy().check_share("compressed", NAMES)  # the defaults allow everything


def test_policy_file_share_fields() -> None:
    parsed = parse_policy({"allowed_share_artifacts": ["delta"], "shareable_layers": ["net.1.*"]})
    assert parsed.allowed_share_artifacts == frozenset({"delta"})
    assert parsed.shareable_layers == ("net.1.*",)
    default = parse_policy({})
    assert default.allowed_share_artifacts == frozenset({"delta", "weights", "compressed"})
    assert default.shareable_layers == ("*",)
    for bad in (
        {"allowed_share_artifacts": ["gradients"]},
        {"allowed_share_artifacts": []},
        {"shareable_layers": "net.1.*"},
        {"shareable_layers": [""]},
    ):
        with pytest.raises(PolicyError, match=next(iter(bad))):
            parse_policy(bad)


def _client_reply(
    overrides: list[str], tmp_path: Path, policy: str | None, message_type: str = "train"
) -> Message:
    grid = InProcessGrid(client_app, 4, seed=0)  # the server-side task identity
    cfg = compose_config("config", [*COMMON, *overrides])
    spec = encode_spec(spec_from_config(cfg, "run1"))
    node_config: dict[str, str | int] = {
        "partition-id": 0,
        "num-partitions": 4,
        "dp-state-dir": str(tmp_path / "state"),
    }
    if policy is not None:
        path = tmp_path / "policy.yaml"
        path.write_text(policy)
        node_config["policy-path"] = str(path)
    context = Context(
        run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
    )
    msg = Message(
        RecordDict(
            {
                "arrays": to_array_record(initial_arrays(cfg)),
                "config": ConfigRecord({"fl-app.spec": spec, "server-round": 1}),
            }
        ),
        dst_node_id=5,
        message_type=message_type,
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    try:
        return client_app(msg, context)
    finally:
        grid.close()


def test_site_policy_refuses_a_shared_head_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fl_app.training as training

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before the policy check")

    monkeypatch.setattr(training, "train_local", no_training)
    reply = _client_reply([], tmp_path, "shareable_layers: ['net.1.*']\n")
    assert reply.has_error()
    assert "site policy `shareable_layers`" in reply.error.reason
    assert "net.3.weight" in reply.error.reason
    reply = _client_reply(["share=body"], tmp_path, "allowed_share_artifacts: [weights]\n")
    assert reply.has_error() and "site policy `allowed_share_artifacts`" in reply.error.reason


def test_policy_allowing_the_body_trains_and_sends_only_the_body(tmp_path: Path) -> None:
    reply = _client_reply(["share=body"], tmp_path, "shareable_layers: ['net.1.*']\n")
    assert not reply.has_error(), reply.error.reason
    assert list(reply.content["update"]) == NAMES[:2]


def test_a_server_sending_a_kept_layer_is_refused(tmp_path: Path) -> None:
    """The instruction must hold exactly the shared layers (no head in, none out)."""
    grid = InProcessGrid(client_app, 4, seed=0)
    cfg = compose_config("config", [*COMMON, "share=body"])
    spec = encode_spec(spec_from_config(cfg, "run1"))
    full = initial_arrays(compose_config("config", COMMON))
    msg = Message(
        RecordDict(
            {
                "arrays": to_array_record(full),
                "config": ConfigRecord({"fl-app.spec": spec, "server-round": 1}),
            }
        ),
        dst_node_id=5,
        message_type="train",
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 4, "dp-state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )
    try:
        reply = client_app(msg, context)
    finally:
        grid.close()
    assert reply.has_error()
    assert reply.error.reason.endswith(
        f"the instruction's weights {NAMES} are not the run's shared layers "
        f"(share.layers=['net.1.*'] selects {NAMES[:2]})"
    )


def test_a_kept_layer_needs_a_state_folder(tmp_path: Path) -> None:
    from fl_app.client.personal import site_layers
    from fl_app.client.refusal import ClientRefusal
    from fl_app.models import build_model

    cfg = compose_config("config", [*COMMON, "share=body"])
    spec = spec_from_config(cfg, "run1")
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ClientRefusal, match="dp-state-dir"):
        site_layers(spec, context, model, initial_arrays(cfg), None, "train")


@pytest.mark.parametrize("case", range(3))
def test_a_kept_layers_file_that_does_not_fit_is_refused(case: int, tmp_path: Path) -> None:
    """Unreadable, other names, or the right names with other shapes: a refusal naming the
    file and the fix, never a model silently built from it."""
    import numpy as np

    from fl_app.client.personal import kept_layers_path, site_layers
    from fl_app.client.refusal import ClientRefusal
    from fl_app.models import build_model
    from fl_app.weights import save_safetensors

    cfg = compose_config("config", [*COMMON, "share=body"])
    spec = spec_from_config(cfg, "run1")
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 4, "dp-state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )
    path = kept_layers_path(tmp_path, "run1", "partition-0")
    if case == 0:
        path.write_bytes(b"\x00" * 4)
        expected = f"kept layers: {str(path)!r} is not a safetensors file (too short)"
    else:
        head = {
            "net.3.weight": np.zeros((10, 64), np.float32),
            "net.3.bias": np.zeros(10, np.float32),
        }
        if case == 1:
            head = {"net.3.weight": head["net.3.weight"], "other": head["net.3.bias"]}
        else:
            head["net.3.bias"] = np.zeros(9, np.float32)
        save_safetensors(path, head, {})
        expected = (
            f"kept layers in {path} hold {sorted(head)}, not this run's "
            "['net.3.weight', 'net.3.bias'] with the model's shapes; move the file away to "
            "start from the initial values"
        )
    with pytest.raises(ClientRefusal) as err:
        site_layers(spec, context, model, initial_arrays(cfg), None, "train")
    assert str(err.value) == expected


def test_kept_layers_file_name_takes_only_a_safe_run_key(tmp_path: Path) -> None:
    from fl_app.client.personal import kept_layers_path
    from fl_app.client.refusal import ClientRefusal

    assert kept_layers_path(tmp_path, "run_1-a", "site-x") == (
        tmp_path / "personal-run_1-a-site-x.safetensors"
    )
    for bad in ("", "../x", "a/b"):
        with pytest.raises(ClientRefusal) as err:
            kept_layers_path(tmp_path, bad, "site-x")
        assert str(err.value) == f"run key {bad!r} is not a safe file-name component"


def test_patterns_are_checked_against_the_configured_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each model config gets its own names (FedBN-style: the CNN's GroupNorm layers
    features.1 and features.5 stay), built afresh when nothing is cached."""
    import fl_app.config.validate_share as validate_share

    monkeypatch.setattr(validate_share, "_NAMES", {})
    mlp = compose_config("config", [*COMMON, "share.layers=[net.*]"])
    assert validate_share.model_state_names(mlp) == tuple(NAMES)
    fedbn = ["share.layers=[features.0.*,features.4.*,head.*]"]
    cnn = compose_config("config", [*COMMON, "model=cnn", *fedbn])
    assert validate_share.model_state_names(cnn) == (
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
        "features.4.weight",
        "features.4.bias",
        "features.5.weight",
        "features.5.bias",
        "head.weight",
        "head.bias",
    )
    with pytest.raises(ConfigRangeError, match="match no parameter"):
        compose_config("config", [*COMMON, "model=cnn", "share.layers=[net.*]"])


REFUSALS = [
    (
        ["share.artifact=weights", "privacy=central"],
        "weights",
        "'weights' only with privacy.mode=none and secagg=off: client-level DP and secure "
        "aggregation bound the update Δ, not the weights; use share.artifact=delta",
    ),
    (["share.layers=[]"], [], 'must list at least one pattern (["*"] shares every layer)'),
    (
        ["share.layers=[net.1.*,head.*]"],
        ["net.1.*", "head.*"],
        f"patterns ['head.*'] match no parameter of model 'mlp' (its names: {NAMES})",
    ),
    (
        ["share.layers=[net.1.*]", "server_eval=true"],
        True,
        "the global model lacks the layers the sites keep (['net.3.weight', 'net.3.bias']): "
        "the server would score it with their initial values; set server_eval=false (each "
        "site's federated evaluation scores its personalized model)",
    ),
]


@pytest.mark.parametrize("case", range(len(REFUSALS)))
def test_share_refusals_name_the_value_found_and_the_fix(case: int) -> None:
    overrides, found, fix = REFUSALS[case]
    with pytest.raises(ConfigError) as err:
        compose_config("config", [*COMMON, *overrides])
    assert (err.value.found, err.value.fix) == (found, fix)
