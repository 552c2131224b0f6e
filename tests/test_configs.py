"""Every file under configs/ composes and validates; bad configs fail early and clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_app.client_spec import ClientSpec, SpecError, decode_spec, encode_spec, spec_from_config
from fl_app.config.compose import compose_config, config_dir, config_hash, parse_overrides
from fl_app.config.errors import ConfigError
from fl_app.config.schema import AppConfig, PartitionerName, StrategyName

CONFIGS = config_dir()
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "experiment")
# Group options that cannot stand alone name the companions a user must set with them.
COMPANIONS = {
    ("dataset", "local"): ["server_eval=false"],
    # A surrogate folder `fl-app synth` wrote (the MST, epsilon 3 one of docs/synthetic-data.md).
    ("dataset", "synthetic"): ["dataset.synthetic_path=tests/fixtures/surrogate-digits-mst-e3"],
    # The global model lacks the heads the sites keep: the server does not score it.
    ("share", "body"): ["server_eval=false"],
    # Secure aggregation needs an encoding bound (or client-side DP clipping).
    ("secagg", "secagg"): ["secagg.clip=10"],
    ("secagg", "secaggplus"): ["secagg.clip=10"],
    # Distributed DP adds its noise shares under secure aggregation.
    ("privacy", "distributed"): ["secagg=secaggplus"],
}


def _group_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]


def test_tree_has_every_group() -> None:
    assert {"dataset", "model", "strategy", "privacy", "secagg", "runtime", "train"} <= set(GROUPS)
    assert (CONFIGS / "experiment").is_dir()


def test_every_yaml_is_covered() -> None:
    covered = {CONFIGS / "config.yaml"}
    covered |= {CONFIGS / g / f"{o}.yaml" for g, o in _group_options()}
    covered |= set((CONFIGS / "experiment").glob("*.yaml"))
    assert set(CONFIGS.rglob("*.yaml")) == covered


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config("config", [f"{group}={option}", *COMPANIONS.get((group, option), [])])
    assert isinstance(cfg, AppConfig)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_experiment_composes_and_validates(name: str) -> None:
    cfg = compose_config("config", [f"experiment={name}"])
    assert cfg.experiment_name == name


def test_default_is_digits_10_iid_clients_5_rounds() -> None:
    cfg = compose_config()
    assert cfg.dataset.kind.value == "digits"
    assert cfg.dataset.num_partitions == 10
    assert cfg.dataset.partitioner is PartitionerName.iid
    assert cfg.num_rounds == 5
    assert cfg.strategy.name is StrategyName.fedavg


def test_overrides_apply_and_change_hash() -> None:
    a = compose_config()
    b = compose_config("config", ["dataset.partitioner=dirichlet", "strategy=fedadam"])
    assert b.dataset.partitioner is PartitionerName.dirichlet
    assert b.strategy.name is StrategyName.fedadam
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(compose_config())


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["dataset.foo=1"], "dataset.foo", "unknown key"),
        (["strategy.lr=1"], "strategy.lr", "unknown key"),
        (["num_rounds=abc"], "num_rounds", "Integer"),
        (["dataset.num_partitions=ten"], "dataset.num_partitions", "Integer"),
        (["strategy.sampling=sometimes"], "strategy.sampling", "expected one of [fixed, poisson]"),
        (["num_rounds=0"], "num_rounds", ">= 1"),
        (["strategy.fraction_train=1.5"], "strategy.fraction_train", "(0, 1]"),
        (["strategy.fraction_train=0"], "strategy.fraction_train", "(0, 1]"),
        (["train.lr=-0.1"], "train.lr", "> 0"),
        (["train.momentum=1.0"], "train.momentum", "[0, 1)"),
        (["dataset.test_fraction=1.0"], "dataset.test_fraction", "< 1"),
        (["dataset.input_shape=[8,8]"], "dataset.input_shape", "channels"),
        (["strategy.min_available_nodes=11"], "strategy.min_available_nodes", "num_partitions"),
        (
            ["strategy.fraction_train=0.1", "strategy.min_train_replies=5"],
            "strategy.min_train_replies",
            "expected cohort",
        ),
        (["strategy=fedprox", "strategy.proximal_mu=0"], "strategy.proximal_mu", "fedavg"),
        (["strategy.proximal_mu=0.1"], "strategy.proximal_mu", "fedprox"),
        (["dataset=mnist", "dataset.hub_path=null"], "dataset.hub_path", "hub"),
        (["dataset=local"], "server_eval", "server_eval=false"),
        (
            ["dataset=local", "server_eval=false", "dataset.site_files=[a.npz,b.npz]"],
            "dataset.num_partitions",
            "dataset.num_partitions=2",
        ),
        (
            [
                "dataset=local",
                "server_eval=false",
                "dataset.local_path=all.npz",
                "dataset.site_files=[a.npz,b.npz,c.npz]",
            ],
            "dataset.site_files",
            "not both",
        ),
        (
            ["dataset=local", "server_eval=false", "dataset.site_files=[a.npz,a.npz,c.npz]"],
            "dataset.site_files",
            "twice",
        ),
        (["dataset.site_files=[a.npz]", "dataset.num_partitions=1"], "dataset.site_files", "local"),
        (["dataset.input_range=[1.0,0.0]"], "dataset.input_range", "low < high"),
        (["dataset.partitioner=natural"], "dataset.natural_id_key", "natural"),
        (
            ["runtime.client_num_cpus=4", "runtime.ray_num_cpus=2"],
            "runtime.client_num_cpus",
            "ever be scheduled",
        ),
        (["runtime.flower_log_level=LOUD"], "runtime.flower_log_level", "WARNING"),
        # Unsafe: asking for a protection this release cannot give must not run quietly.
        (["privacy.mode=central"], "privacy.threat_model", "needs a threat model"),
        (["privacy.mode=distributed"], "privacy.threat_model", "go together"),
        (["privacy=distributed"], "secagg.mode", "under secure aggregation"),
        (
            ["privacy=distributed", "secagg=secaggplus", "privacy.accountant=pld"],
            "privacy.accountant",
            "privacy.accountant=rdp",
        ),
        (
            ["privacy=distributed", "secagg=secaggplus", "privacy.clipping=adaptive"],
            "privacy.clipping",
            "fixed",
        ),
        (
            [
                "privacy=distributed",
                "secagg=secaggplus",
                "strategy.fraction_train=0.5",
                "strategy.min_train_replies=1",
            ],
            "strategy.sampling",
            "poisson",
        ),
        (
            ["privacy=distributed", "secagg=secaggplus", "secagg.bits=8"],
            "secagg.bits",
            "secagg.bits >= 10",
        ),
        (["privacy=central", "privacy.clip=null"], "privacy.clip", "clip norm"),
        (["privacy=central", "privacy.delta=2"], "privacy.delta", "(0, 1)"),
        (["privacy=central", "privacy.target_epsilon=3"], "privacy.noise_multiplier", "exactly"),
        (
            [
                "privacy=central",
                "privacy.noise_multiplier=null",
                "privacy.target_epsilon=5",
                "privacy.max_epsilon=4",
            ],
            "privacy.target_epsilon",
            "exceeds the budget",
        ),
        # Server-side clipping cannot hide updates from the server.
        (
            ["privacy=central", "privacy.threat_model=honest_but_curious"],
            "privacy.clip_side",
            "never see an update",
        ),
        (
            [
                "privacy=central",
                "privacy.threat_model=honest_but_curious",
                "privacy.clip_side=client",
            ],
            "secagg.mode",
            "needs secure aggregation",
        ),
        (["privacy=central", "secagg.mode=secaggplus"], "privacy.clip_side", "cannot clip"),
        (
            ["privacy=central", "strategy.fraction_train=0.5"],
            "privacy.accountant",
            "replace-one",
        ),
        (
            ["privacy=central_adaptive", "privacy.clipped_count_stddev=0.4"],
            "privacy.clipped_count_stddev",
            "2*clipped_count_stddev",
        ),
        (
            ["privacy=central_adaptive", "privacy.target_quantile=1.5"],
            "privacy.target_quantile",
            "(0, 1)",
        ),
        (["privacy=local", "privacy.clipping=adaptive"], "privacy.clipping", "mode=central"),
        (["privacy.mode=dpsgd"], "privacy.mode", "expected one of"),
        (
            ["privacy.threat_model=trusted_server"],
            "privacy.threat_model",
            "cannot claim a threat model",
        ),
        (["privacy.record_level=true"], "privacy.dpsgd.noise_multiplier", "exactly one of"),
        (
            ["privacy=dpsgd", "privacy.dpsgd.target_epsilon=3"],
            "privacy.dpsgd.noise_multiplier",
            "exactly one of",
        ),
        (
            ["privacy=dpsgd", "privacy.dpsgd.noise_multiplier=-1"],
            "privacy.dpsgd.noise_multiplier",
            "> 0",
        ),
        (["privacy=dpsgd", "privacy.dpsgd.delta=0"], "privacy.dpsgd.delta", "(0, 1)"),
        (
            [
                "privacy=dpsgd",
                "privacy.dpsgd.noise_multiplier=null",
                "privacy.dpsgd.target_epsilon=9",
                "privacy.dpsgd.max_epsilon=8",
            ],
            "privacy.dpsgd.target_epsilon",
            "exceeds the budget",
        ),
        (["privacy=dpsgd", "strategy=fedprox"], "strategy.proximal_mu", "DP-SGD"),
        (["model=cnn", "model.norm_groups=3"], "model.norm_groups", "divide"),
        (
            ["privacy=dpsgd", "privacy.dpsgd.grad_sample_mode=fast"],
            "privacy.dpsgd.grad_sample_mode",
            "expected one of",
        ),
        (["privacy.noise_multiplier=1.0"], "privacy.noise_multiplier", "no effect"),
        (["secagg.mode=secagg"], "secagg.clip", "needs an L2 bound"),
        (
            ["secagg=secagg", "secagg.clip=1", "secagg.bits=16", "dataset.num_partitions=100"],
            "secagg.bits",
            "overflow",
        ),
        (["secagg=secaggplus", "secagg.clip=1", "privacy=local"], "privacy.mode", "unbounded"),
        (
            ["secagg=secaggplus", "secagg.clip=1", "secagg.dropout_tolerance=0.6"],
            "secagg.dropout_tolerance",
            "lower dropout_tolerance",
        ),
    ],
)
def test_bad_config_fails_naming_field_and_fix(
    overrides: list[str], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config("config", overrides)
    assert info.value.field == field
    assert words in str(info.value)


def test_unknown_group_option_fails() -> None:
    with pytest.raises(ConfigError):
        compose_config("config", ["strategy=fedsomething"])


def test_parse_overrides_handles_quotes() -> None:
    assert parse_overrides("a=1 b='x y'  c=3") == ["a=1", "b=x y", "c=3"]
    assert parse_overrides("") == []


def test_client_spec_round_trip_and_rejects_garbage() -> None:
    cfg = compose_config("config", ["model=cnn", "seed=7"])
    spec = spec_from_config(cfg)
    back = decode_spec(encode_spec(spec))
    assert back == spec
    assert isinstance(back, ClientSpec)
    for bad in [
        None,
        "not json",
        "[1]",
        '{"seed": "x"}',
        '{"model": {"name": "evil"}}',
        '{"dataset": {"_target_": "os.system"}}',
    ]:
        with pytest.raises(SpecError):
            decode_spec(bad)


def test_configs_dir_resolved_from_package_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert compose_config().num_rounds == 5


@pytest.mark.parametrize("privacy", sorted(p.stem for p in (CONFIGS / "privacy").glob("*.yaml")))
def test_secure_mode_is_the_default_of_every_privacy_config(privacy: str) -> None:
    """CSPRNG randomness by default (seeded noise is an explicit opt-in), and DP-SGD's
    keystream needs no optional backend (Opacus' torchcsprng is not published)."""
    extra = {"distributed": ["secagg=secaggplus"]}.get(privacy, [])
    assert compose_config("config", [f"privacy={privacy}", *extra]).privacy.secure_mode is True


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("privcy=central", "`privacy=central`"),
        ("privacy.noise_multipler=1", "`privacy.noise_multiplier=1`"),
        ("privacy.max_grad_norm=2", "`privacy.dpsgd.max_grad_norm=2`"),
        ("strategy.fraction_trian=0.5", "`strategy.fraction_train=0.5`"),
    ],
)
def test_typos_get_did_you_mean_from_the_schema_never_plus_key(override, suggestion):
    with pytest.raises(ConfigError) as err:
        compose_config("config", [override])
    message = str(err.value)
    assert f"did you mean {suggestion}" in message
    assert "+" not in message  # Hydra's "+key=" advice would only add a stray key


def test_valid_overrides_pass_the_key_check():
    from fl_app.config.compose import check_override_keys

    check_override_keys(
        [
            "privacy=central",
            "strategy.fraction_train=0.5,1.0",
            "dataset.input_shape.0=1",
            "hydra.run.dir=/tmp/x",
            "~checkpoint",
            "experiment=digits_iid",
        ]
    )


def test_simulate_typo_exits_2_with_suggestion_and_leaves_no_run_directory(
    tmp_path, monkeypatch, capsys
):
    from fl_app.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "privcy=central"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean `privacy=central`" in err and "+privcy" not in err
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time> with only cli.log
    # A bad value (found only once the config is composed) leaves none either.
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "num_rounds=0"])
    assert stop.value.code == 2 and "`num_rounds`" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sweep_jobs_with_bad_values_are_marked_failed_and_the_sweep_exits_non_zero(tmp_path):
    import json
    import subprocess
    import sys

    from fl_app.release.report import collect_jobs

    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("fl-app")),
            "simulate",
            "-m",
            "strategy.fraction_train=1.5,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "job 0 failed: config error in `strategy.fraction_train`" in done.stderr
    assert "job 1 failed" in done.stderr  # the first failure did not stop the sweep
    for job in ("0", "1"):
        verdict = json.loads((sweep / job / "summary.json").read_text())
        assert verdict["status"] == "failed" and "(0, 1]" in verdict["status_reason"]
    assert [j.status for j in collect_jobs(sweep)] == ["failed", "failed"]
