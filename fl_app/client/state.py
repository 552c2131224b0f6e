"""The privacy state stores' in-memory copy, kept in Flower's ``Context.state``.

:mod:`fl_app.privacy.state` holds the rules (the file is the truth, memory must agree
with it, a missing file after a release refuses) and no Flower import; this module
gives its stores the node's memory: one ``Context.state`` record per kind of state,
which survives rounds while the SuperNode (or simulation) process lives.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context

from fl_app.privacy.state import ClientPrivacyState, LocalDpStore

__all__ = ["LOCAL_DP_RECORD", "STATE_RECORD", "ContextMemory", "dpsgd_store", "local_dp_store"]

#: Context.state record of a DP-SGD client's state (:class:`ClientPrivacyState`).
STATE_RECORD = "fl-app.dpsgd"
#: Context.state record of a local-DP client's release count (:class:`LocalDpStore`).
LOCAL_DP_RECORD = "fl-app.local-dp"


class ContextMemory:
    """A :class:`fl_app.privacy.state.StateMemory` in the record ``name`` of ``Context.state``."""

    def __init__(self, context: Context, name: str) -> None:
        self.context = context
        self.name = name

    def get(self) -> str | None:
        """The saved copy; None if absent, or not a string (a foreign record)."""
        record = self.context.state.config_records.get(self.name)
        if record is None:
            return None
        value = record.get("state")
        return value if isinstance(value, str) else None

    def put(self, text: str) -> None:
        self.context.state[self.name] = ConfigRecord({"state": text})


def dpsgd_store(
    context: Context, state_dir: str | os.PathLike[str], run_key: str, site: str | int
) -> ClientPrivacyState:
    """This node's DP-SGD state for one run (file in ``state_dir``, memory in ``context``)."""
    return ClientPrivacyState(ContextMemory(context, STATE_RECORD), state_dir, run_key, site)


def local_dp_store(
    context: Context, state_dir: str | os.PathLike[str], run_key: str, site: str
) -> LocalDpStore:
    """This node's local-DP release count for one run (file in ``state_dir``, memory in
    ``context``)."""
    return LocalDpStore(ContextMemory(context, LOCAL_DP_RECORD), state_dir, run_key, site)
