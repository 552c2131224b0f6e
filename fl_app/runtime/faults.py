"""Lost replies on the in-process grid: the drop rules tests use to kill a node.

:meth:`~fl_app.runtime.inprocess.InProcessGrid.drop_at` adds a :class:`DropRule`
("lose node n's reply to its 2nd train message", "node n dies there"); the grid's
``drop`` callable is a free-form rule. :class:`DropRules` evaluates all of them for
each delivery; the node still runs its handler (its ``Context`` changes), only the
reply is lost, as when a node dies before replying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Context, Message

from fl_app.runtime.link import ReplyInbox

__all__ = ["DropFn", "DropRule", "DropRules", "FaultInjection", "MessageHook"]

#: ``drop(node_id, instruction) -> bool``; ``True`` loses that node's reply.
DropFn = Callable[[int, Message], bool]
#: ``message_hook(node_id, reply) -> replacement``: a ``Message``, several, or ``None``.
MessageHook = Callable[[int, Message], "Message | Sequence[Message] | None"]


@dataclass
class DropRule:
    """State of one :meth:`~fl_app.runtime.inprocess.InProcessGrid.drop_at` rule."""

    node_id: int
    message_type: str | None
    group_id: str | None
    nth: int
    count: int | None
    seen: int = 0
    dropped: int = 0

    def matches(self, node_id: int, message: Message) -> bool:
        """Return whether ``message`` to ``node_id`` is one this rule counts."""
        if node_id != self.node_id:
            return False
        meta = message.metadata
        if self.message_type is not None:
            mtype = meta.message_type
            if mtype != self.message_type and mtype.split(".", 1)[0] != self.message_type:
                return False
        return self.group_id is None or meta.group_id == self.group_id

    def should_drop(self, node_id: int, message: Message) -> bool:
        """Count ``message`` if it matches and return whether its reply is lost."""
        if self.count is None and self.dropped and node_id == self.node_id:
            return True  # the node died at the chosen message: everything is lost
        if not self.matches(node_id, message):
            return False
        self.seen += 1
        if self.seen < self.nth:
            return False
        if self.count is not None and self.dropped >= self.count:
            return False
        self.dropped += 1
        return True


class DropRules:
    """Every drop rule of one grid, plus its optional free-form ``drop`` callable."""

    def __init__(self, drop: DropFn | None) -> None:
        self._drop = drop
        self._rules: list[DropRule] = []

    def add(
        self,
        node_id: int,
        message_type: str | None,
        group_id: str | int | None,
        *,
        nth: int,
        count: int | None,
    ) -> None:
        """Add a rule (see ``InProcessGrid.drop_at``); ``nth``/``count`` must be >= 1."""
        if nth < 1:
            raise ValueError(f"nth must be >= 1, got {nth}")
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1 or None, got {count}")
        self._rules.append(
            DropRule(
                node_id=node_id,
                message_type=message_type,
                group_id=None if group_id is None else str(group_id),
                nth=nth,
                count=count,
            )
        )

    def should_drop(self, node_id: int, message: Message) -> bool:
        """Return whether the reply of ``node_id`` to ``message`` is lost."""
        # Evaluate every rule so that each one counts its matches.
        dropped = False
        for rule in self._rules:
            dropped = rule.should_drop(node_id, message) or dropped
        if self._drop is not None and self._drop(node_id, message):
            dropped = True
        return dropped


class FaultInjection:
    """The grid's fault-injection API for tests: lose chosen replies, inject forged ones.

    A mixin of :class:`~fl_app.runtime.inprocess.InProcessGrid`, which provides the
    attributes declared here.
    """

    _drop_rules: DropRules
    _inbox: ReplyInbox

    def context(self, node_id: int) -> Context:
        """Return the live ``Context`` of ``node_id`` (``KeyError`` if unknown)."""
        raise NotImplementedError

    def drop_at(
        self,
        node_id: int,
        message_type: str | None = None,
        group_id: str | int | None = None,
        *,
        nth: int = 1,
        count: int | None = 1,
    ) -> None:
        """Lose the reply of ``node_id`` to chosen future instructions.

        Counting starts with the next matching instruction delivered after this call.
        The node still processes the instruction (its ``Context`` changes).

        Parameters
        ----------
        node_id : int
            Node to affect.
        message_type : str, optional
            Only count instructions of this type: an exact type (``"train.custom"``)
            or a category (``"train"`` matches ``"train"`` and ``"train.*"``).
            ``None`` counts every type.
        group_id : str or int, optional
            Only count instructions with this ``group_id`` (compared as ``str``).
        nth : int, default 1
            Start dropping at the ``nth`` matching instruction (1-based), e.g.
            ``drop_at(n, "train", nth=2)`` loses the reply to its 2nd train message.
        count : int or None, default 1
            How many matching replies to lose, from the ``nth`` on. ``None``: the node
            dies at the ``nth`` matching instruction; its replies to *every* later
            instruction (any type or group) are lost too.

        Raises
        ------
        KeyError
            If ``node_id`` is not a node of this grid.
        ValueError
            If ``nth < 1`` or ``count < 1``.
        """
        self.context(node_id)  # validates the id
        self._drop_rules.add(node_id, message_type, group_id, nth=nth, count=count)

    def inject_reply(self, message: Message, *, match_any: bool = False) -> None:
        """Queue an arbitrary reply (stale, duplicate, forged) for the server.

        The message is delivered as is (not validated, not copied). A missing
        ``message_id`` is filled with a fresh UUID.

        Parameters
        ----------
        message : Message
            The reply. Unless ``match_any``, it is returned by the next
            :meth:`pull_messages` (or :meth:`send_and_receive`) whose ids include its
            ``metadata.reply_to_message_id``.
        match_any : bool, default False
            Return it with the next pull whatever ids that pull asks for (e.g. a reply
            to a previous round's instruction surfacing in the current round).

        Raises
        ------
        TypeError
            If ``message`` is not a ``Message``.
        ValueError
            If ``match_any`` is false and the message has no ``reply_to_message_id``.
        """
        self._inbox.inject(message, match_any=match_any)
