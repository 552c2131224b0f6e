"""A client never accepts, within one run, weaker protection than it already used.

The spec does not carry the run's threat model, and a deviating server can simply send
a plain train instruction (no secure-aggregation stage) to a distributed-DP client and
get its raw update and plaintext loss/accuracy/example count, or drop local DP's noise,
or ask for federated evaluation. So once a run key has trained under secure aggregation
(``secagg``; with distributed DP, ``ddp``) or local DP (``local-dp``), the client
remembers it in ``Context.state`` and refuses, for that run key, plain train
instructions, a secure round without the distributed-DP noise, a train without local
noise, and (where the protected instruction hid per-client metrics, ``hide-metrics``)
federated evaluation. A distributed-DP noise schedule (``privacy.schedule``, each
client checks its round's ``z`` against it: :mod:`fl_app.privacy.ddp_schedule`) is pinned
the same way (``ddp-schedule:<digest>``): a later instruction stating another schedule,
or none, is refused. A server that renames the run starts unmarked:
``require_secure_aggregation: true`` in the site policy is the guard from the first
message on. Where the node keeps ``dp-state-dir``, the marks are also kept there
(``protected-runs-<site>.json``), so a restarted SuperNode (fresh ``Context.state``)
remembers them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fl_app.client.identity import DP_STATE_DIR_KEY, site_identity
from fl_app.client.policy import PolicyViolation
from fl_app.client.refusal import ClientRefusal, PolicyRefusal
from fl_app.client_spec import ClientSpec

__all__ = ["PROTECTED_RUNS_KEY", "refuse_downgrade"]

#: Context.state record: run key -> the protections this client has used in that run.
PROTECTED_RUNS_KEY = "fl-app.protected-runs"


def refuse_downgrade(
    context: Context, spec: ClientSpec, message_type: str, secure: Any, local_dp: bool
) -> None:
    """Refuse an instruction weaker than what this client already used in the run
    (module docstring), and remember the protections a train instruction uses."""
    record = context.state.config_records.get(PROTECTED_RUNS_KEY)
    key = f"run:{spec.run_key}"
    raw = record.get(key) if record is not None else None
    marks = set(str(raw).split(",")) if raw else set()
    stored = _stored_protections(context)
    marks |= set(stored.get(spec.run_key, []))
    if message_type == "train":
        ddp = secure is not None and getattr(secure, "ddp", None) is not None
        _check_train(marks, spec, secure, ddp, local_dp)
        schedule = _check_schedule(marks, spec) if ddp else None
        new = set(marks) | ({schedule} if schedule else set())
        if secure is not None:
            new |= {"secagg", "ddp"} if ddp else {"secagg"}
        if local_dp:
            new.add("local-dp")
        if new - marks and spec.hide_client_metrics:
            new.add("hide-metrics")
        if new != marks:
            values = dict(record) if record is not None else {}
            values[key] = ",".join(sorted(new))
            context.state[PROTECTED_RUNS_KEY] = ConfigRecord(values)
            _store_protections(context, {**stored, spec.run_key: sorted(new)})
    elif "hide-metrics" in marks or "local-dp" in marks:
        raise ClientRefusal(
            "federated evaluation: this run trained under a threat model that hides "
            "per-client numbers from the server; this client does not evaluate in it"
        )


def _check_train(marks: set[str], spec: ClientSpec, secure: Any, ddp: bool, local_dp: bool) -> None:
    """A train instruction weaker than the run's marks (or than its own spec) refuses."""
    if secure is None and not local_dp and spec.hide_client_metrics:
        # The spec itself says the server is not trusted with per-client numbers
        # (honest_but_curious, distributed_dp): a plain train contradicts it. (A server
        # that also clears the flag is caught from the run's second round on, or from
        # the first by require_secure_aggregation.)
        raise PolicyRefusal(
            PolicyViolation(
                "require_secure_aggregation",
                "this run's threat model hides per-client numbers from the server, but "
                "this train instruction is a plain one (no secure aggregation, no local "
                "noise: the server would see the update), refused",
            )
        )
    if ("secagg" in marks and secure is None) or ("ddp" in marks and not ddp):
        raise PolicyRefusal(
            PolicyViolation(
                "require_secure_aggregation",
                "this run already trained under secure aggregation"
                + (" with distributed DP" if "ddp" in marks else "")
                + "; this train instruction "
                + ("is a plain one" if secure is None else "has no distributed-DP noise")
                + " (a downgrade: the server would see this client's update), refused",
            )
        )
    if "local-dp" in marks and not local_dp:
        raise ClientRefusal(
            "this run already trained under local DP; this train instruction has no "
            "local noise (a downgrade: the server would see the un-noised update), refused"
        )


def _check_schedule(marks: set[str], spec: ClientSpec) -> str:
    """The spec's distributed-DP schedule mark; refuse one that differs from the pinned."""
    stated = spec.client_dp.ddp_schedule if spec.client_dp is not None else None
    # "none" is pinned too: a run that began with constant noise cannot switch to a
    # schedule later (the README's "an instruction stating another, or none, is refused").
    mark = "ddp-schedule:none"
    if stated is not None:
        text = json.dumps(dataclasses.asdict(stated), sort_keys=True, default=str)
        mark = "ddp-schedule:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    pinned = {m for m in marks if m.startswith("ddp-schedule:")}
    if pinned and pinned != {mark}:
        raise PolicyRefusal(
            PolicyViolation(
                "privacy.schedule",
                "this run's distributed-DP noise schedule was stated at its start and this "
                "instruction states "
                + ("another" if stated is not None else "none")
                + " (the client checks each round's noise against the first), refused",
            )
        )
    return mark


def _protections_path(context: Context) -> Path | None:
    directory = context.node_config.get(DP_STATE_DIR_KEY)
    if not directory:
        return None
    return Path(str(directory)) / f"protected-runs-{site_identity(context.node_config)}.json"


def _stored_protections(context: Context) -> dict[str, list[str]]:
    """The run keys' marks kept beside the site's DP state (``{}``: none or no directory)."""
    path = _protections_path(context)
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ClientRefusal(
            f"protected-runs file {path}: unreadable ({err}); restore or delete it"
        ) from err
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in data.values()
    ):
        raise ClientRefusal(f"protected-runs file {path}: not a run-key -> marks mapping")
    return data


def _store_protections(context: Context, data: dict[str, list[str]]) -> None:
    path = _protections_path(context)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise ClientRefusal(f"protected-runs file {path}: cannot write it ({err})") from err
