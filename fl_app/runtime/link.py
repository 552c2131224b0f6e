"""The SuperLink side of the in-process grid: what it accepts and the reply queue.

:class:`~fl_app.runtime.inprocess.InProcessGrid` checks an instruction as Flower's
``InMemoryGrid`` and ``LinkState`` do (but raises), screens a reply as the SuperLink
would (a reply that is not a reply to its instruction, or comes from another node,
never reaches the server), and queues accepted replies in :class:`ReplyInbox` until
the server pulls them, each once.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import NamedTuple
from uuid import uuid4

from flwr.app import Message
from flwr.server.utils.validator import validate_message

__all__ = ["Delivery", "Rejection", "ReplyInbox", "check_instruction", "reply_problems"]


class Delivery(NamedTuple):
    """One instruction delivered to a node (an entry of ``InProcessGrid.sent``).

    Attributes
    ----------
    node_id : int
        Destination node.
    message_type : str
        ``metadata.message_type`` of the instruction, e.g. ``"train"``.
    group_id : str
        ``metadata.group_id`` of the instruction (``""`` for Flower's strategies).
    """

    node_id: int
    message_type: str
    group_id: str


class Rejection(NamedTuple):
    """A reply that the SuperLink would not have accepted (never reaches the server).

    Attributes
    ----------
    node_id : int
        Node whose ClientApp produced the reply.
    reply : Message
        The reply as the ClientApp returned it.
    reasons : list[str]
        Why it was rejected: validation errors or a serialization error.
    """

    node_id: int
    reply: Message
    reasons: list[str]


def check_instruction(message: Message, node_ids: Container[int], run_id: int) -> None:
    """Validate an instruction like ``InMemoryGrid`` + ``LinkState`` (but raise)."""
    meta = message.metadata
    if not (
        meta.message_id != ""
        and meta.reply_to_message_id == ""
        and meta.ttl > 0
        and meta.delivered_at == ""
    ):
        raise ValueError(f"Invalid message: {message}")
    if meta.dst_node_id not in node_ids:
        raise ValueError(f"Unknown destination node id {meta.dst_node_id}")
    if meta.run_id != run_id:
        raise ValueError(
            f"Message run_id {meta.run_id} != grid run_id {run_id} "
            "(is TaskIdentity set by another grid?)"
        )
    errors = validate_message(message, is_reply_message=False)
    if errors:
        raise ValueError(f"Invalid message ({'; '.join(errors)}): {message}")


def reply_problems(node_id: int, instruction: Message, reply: Message) -> list[str]:
    """Why the SuperLink would refuse ``reply`` from ``node_id`` (empty: accepted)."""
    meta = reply.metadata
    reasons = list(validate_message(reply, is_reply_message=True))
    if meta.reply_to_message_id != instruction.metadata.message_id:
        reasons.append(
            f"reply_to_message_id {meta.reply_to_message_id!r} is not the instruction's "
            f"id {instruction.metadata.message_id!r}"
        )
    if meta.src_node_id != node_id:
        reasons.append(f"src_node_id {meta.src_node_id} is not the replying node {node_id}")
    if meta.run_id != instruction.metadata.run_id:
        reasons.append(f"run_id {meta.run_id} != {instruction.metadata.run_id}")
    return reasons


class ReplyInbox:
    """Replies waiting to be pulled, in arrival order, each handed out once.

    Each entry is keyed by the id of the instruction it answers; a key of ``None``
    means "returned by the next pull, whatever ids it asks for".
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str | None, Message]] = []

    def put(self, key: str | None, reply: Message) -> None:
        """Queue ``reply`` (as is) for the pull that asks for ``key``."""
        self._entries.append((key, reply))

    def inject(self, message: Message, *, match_any: bool) -> None:
        """Queue an arbitrary reply (see ``InProcessGrid.inject_reply``)."""
        if not isinstance(message, Message):
            raise TypeError(f"Expected a Message, got {type(message).__name__}")
        key: str | None = None
        if not match_any:
            key = message.metadata.reply_to_message_id
            if not key:
                raise ValueError(
                    "Injected reply has no reply_to_message_id; set it or use match_any=True"
                )
        if not message.metadata.message_id:
            message.metadata.__dict__["_message_id"] = str(uuid4())
        self._entries.append((key, message))

    def pull(self, message_ids: Iterable[str]) -> list[Message]:
        """Remove and return the replies to ``message_ids`` plus any ``None``-keyed ones."""
        wanted = set(message_ids)
        out: list[Message] = []
        keep: list[tuple[str | None, Message]] = []
        for key, reply in self._entries:
            if key is None or key in wanted:
                out.append(reply)
            else:
                keep.append((key, reply))
        self._entries = keep
        return out
