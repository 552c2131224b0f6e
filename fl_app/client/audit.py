"""The site's hash-chained audit log around each instruction (node-config ``audit-dir``).

One file per run and site, ``audit-<run key>-<site identity>.jsonl``
(:func:`client_audit_path`), opened, verified, appended and closed per message
(deployment starts a process per message). Each train/evaluate instruction that carries
a spec leaves ``client.round`` (round, message type, the artifact released, ε, policy)
or ``client.refused`` (round, reason, policy field); the key-exchange stages of secure
aggregation release no data-derived artifact and are not logged. Counts, ids and ε only:
never data, updates or metrics values. A log that fails verification stops the client
(every instruction is refused) until it is moved aside. The log format itself is
:mod:`fl_app.audit`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from flwr.app import Context, Message

from fl_app.client.enforce import artifact
from fl_app.client.identity import AUDIT_DIR_KEY, SAFE_RUN_KEY, SAFE_SITE_NAME, site_identity
from fl_app.client.refusal import ClientRefusal
from fl_app.client_spec import ClientSpec, SpecError, decode_spec
from fl_app.protocol import CONFIG_KEY, METRICS_KEY, SERVER_ROUND, SPEC_KEY

__all__ = ["ClientAudit", "client_audit_path"]


def _audit_names(run_key: str, partition_id: object) -> tuple[str, str]:
    key = run_key if SAFE_RUN_KEY.fullmatch(run_key) else "unknown"
    try:
        pid = str(int(cast(Any, partition_id)))
    except (TypeError, ValueError):
        pid = "unknown"
    return key, pid


def client_audit_path(directory: str | Path, run_key: str, site: object) -> Path:
    """``<directory>/audit-<run key>-<site identity>.jsonl``.

    ``site`` is a :func:`~fl_app.client.identity.site_identity` string, or a simulated
    partition id (an int: ``partition-<id>``). Unsafe parts become "unknown".
    """
    if isinstance(site, str) and (
        site.startswith(("site-", "data-", "partition-"))
        and SAFE_SITE_NAME.fullmatch(site.split("-", 1)[1])
    ):
        key = run_key if SAFE_RUN_KEY.fullmatch(run_key) else "unknown"
        return Path(directory) / f"audit-{key}-{site}.jsonl"
    key, pid = _audit_names(run_key, site)
    return Path(directory) / f"audit-{key}-partition-{pid}.jsonl"


class ClientAudit:
    """The site's audit log around one instruction (node-config ``audit-dir``).

    Opened, and so verified, *before* the handler runs: a broken log refuses the
    instruction. Closed when the instruction's record is written.
    """

    def __init__(self, audit_log: Any, message_type: str, rnd: object, artifact: str | None):
        self.log = audit_log
        self.message_type = message_type
        self.round = rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None
        self.artifact = artifact

    @classmethod
    def open(cls, msg: Message, context: Context, message_type: str) -> ClientAudit | None:
        """None when the node keeps no audit log, or for a key-exchange stage (no spec)."""
        from fl_app.audit import AuditError, AuditLog

        directory = context.node_config.get(AUDIT_DIR_KEY)
        config = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
        if directory is None or directory == "" or config is None or SPEC_KEY not in config:
            return None
        try:
            spec: ClientSpec | None = decode_spec(config.get(SPEC_KEY))
        except SpecError:
            spec = None  # the handler refuses it; the refusal is still logged
        run_key = spec.run_key if spec is not None else ""
        key, pid = _audit_names(run_key, context.node_config.get("partition-id", 0))
        site = site_identity(context.node_config)
        path = client_audit_path(str(directory), key, site)
        try:
            audit_log = AuditLog(path)
        except (AuditError, OSError) as err:
            raise ClientRefusal(
                f"client audit log: {err} (node-config {AUDIT_DIR_KEY}={directory!r}); "
                "this site trains only with an intact audit log"
            ) from err
        try:
            if audit_log.records == 0:
                audit_log.append(
                    "run.start",
                    {"role": "client", "run_key": key, "partition": pid, "site": site},
                )
            released = None
            if spec is not None:
                try:
                    released = artifact(spec, message_type, config)
                except ValueError:
                    released = None
        except BaseException:
            audit_log.close()
            raise
        return cls(audit_log, message_type, config.get(SERVER_ROUND), released)

    def released(self, reply: Message, policy: bool) -> None:
        """``client.round``: what left the client, its ε, the policy verdict."""
        epsilon: dict[str, float] = {}
        if reply.has_content() and METRICS_KEY in reply.content.metric_records:
            metrics = reply.content.metric_records[METRICS_KEY]
            for key, name in (("dp-epsilon", "record_level"), ("dp-local-epsilon", "local")):
                value = metrics.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    epsilon[name] = float(value)
        self.log.append(
            "client.round",
            {
                "round": self.round,
                "message_type": self.message_type,
                "artifact": self.artifact,
                "epsilon": epsilon,
                "policy": "ok" if policy else "none",
            },
        )

    def refused(self, err: ClientRefusal) -> None:
        """``client.refused``: the reason sent to the server and the policy field, if any."""
        self.log.append(
            "client.refused",
            {
                "round": self.round,
                "message_type": self.message_type,
                "code": int(err.code),
                "policy_field": getattr(err, "field", None),
                "reason": str(err),
            },
        )

    def close(self) -> None:
        self.log.close()
