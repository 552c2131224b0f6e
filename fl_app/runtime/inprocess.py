"""In-process :class:`~flwr.serverapp.Grid` that runs a real ``ClientApp``.

:class:`InProcessGrid` is a synchronous, single-process stand-in for the SuperLink
plus a fleet of SuperNodes. It is meant for two things:

* **tests** of ServerApp/strategy code and of ClientApp code (handlers *and* their
  mods) without Ray, gRPC or subprocesses, with deterministic node ids, fault
  injection (dropped replies, forged/stale/duplicate replies, reply fuzzing) and a
  log of every delivered instruction;
* a **Ray-free simulation backend** fast enough for 1,000 clients per round.

How it works
------------
The ClientApp runs **eagerly, inside** :meth:`InProcessGrid.push_messages`: every
instruction is delivered to its node, the node's handler runs to completion and its
reply is queued. :meth:`InProcessGrid.pull_messages` only hands out queued replies
(each reply once). Because everything that will ever arrive has arrived when
``push_messages`` returns, :meth:`InProcessGrid.send_and_receive` never sleeps:
a reply that was dropped is simply missing from its result, whatever ``timeout``.

With ``copy_messages=True`` (default) the instruction a node receives and the reply
the server receives are independent copies made through Flower's serialization
(:mod:`fl_app.runtime.copies`: ``copy_mode="records"``, fast, or ``"wire"``, exact).

The grid's parts, one concern each: :mod:`fl_app.runtime.nodes` (node ids, contexts,
task identity, calling the ClientApp; client-side exceptions become error replies
exactly as Flower's SuperNode runtime builds them and never propagate to the server),
:mod:`fl_app.runtime.link` (the SuperLink's checks and the reply queue),
:mod:`fl_app.runtime.faults` (lost replies) and :mod:`fl_app.runtime.copies`.

Examples
--------
>>> grid = InProcessGrid(client_app, num_nodes=10)  # doctest: +SKIP
>>> result = FedAvg().start(grid=grid, initial_arrays=arrays, num_rounds=2)  # doctest: +SKIP
>>> grid.close()  # restore the process-wide TaskIdentity  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Literal
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run

from fl_app.runtime.copies import batch_copies, records_copy, wire_copy
from fl_app.runtime.faults import DropFn, DropRules, FaultInjection, MessageHook
from fl_app.runtime.link import (
    Delivery,
    Rejection,
    ReplyInbox,
    check_instruction,
    reply_problems,
)
from fl_app.runtime.nodes import (
    SERVER_TASK_ID,
    Identity,
    NodeConfigFn,
    exception_reason,
    get_identity,
    make_contexts,
    make_node_ids,
    run_client_app,
    set_identity,
)

__all__ = ["InProcessGrid"]

_LOG = logging.getLogger(__name__)


class InProcessGrid(FaultInjection, Grid):
    """A synchronous in-process ``Grid`` that runs a ``ClientApp`` on virtual nodes.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp to run. It is called like Flower's runtimes call it
        (``client_app(message=..., context=...)``), so its handlers, app-level and
        handler-level mods and lifespan all apply.
    num_nodes : int
        Number of virtual nodes (>= 1).
    node_config_fn : callable, optional
        ``node_config_fn(partition_id, num_nodes) -> dict`` giving each node's
        ``Context.node_config``. Default: ``{"partition-id": i, "num-partitions": n}``,
        as in Flower's simulation.
    run_id : int, default 1
        Run id of the :class:`~flwr.supercore.run.Run` and of every ``Context``.
    seed : int, default 0
        Seed of ``np.random.default_rng`` that draws the node ids.
    drop : callable, optional
        ``drop(node_id, instruction) -> bool``. When it returns ``True`` the node
        still receives and processes the instruction (its ``Context`` is updated) but
        its reply is lost, as if the node died before replying.
    copy_messages : bool, default True
        Deliver instructions and return replies as copies made through Flower's
        serialization. With ``False`` the very same objects are handed across (fastest,
        no isolation: only for trusted, read-only handlers).
    copy_mode : {"records", "wire"}, default "records"
        How to copy when ``copy_messages``: :func:`records_copy` (fast, record-level
        serialization) or :func:`wire_copy` (Flower's complete wire path, ~7x slower).
    run_config : dict, optional
        ``Context.run_config`` of every node (each node gets its own shallow copy) and
        ``Run.override_config``.
    message_hook : callable, optional
        ``message_hook(node_id, reply) -> Message | Sequence[Message] | None``, applied
        to each reply after the SuperLink-side checks and the copy, just before it
        is queued for the server: return a replacement, several messages (duplicates,
        forgeries) or ``None`` (lose it). Whatever it returns is delivered with the pull
        of the instruction it answers, unvalidated and uncopied (for fuzzing servers).
    drop_reply : {"lost", "node_unavailable"}, default "lost"
        What the server sees for a dropped reply: nothing (``"lost"``), or the error
        reply Flower's SuperLink synthesizes for a node that went offline
        (``"node_unavailable"``: ``ErrorCode.NODE_UNAVAILABLE``, from
        ``create_message_error_unavailable_res_message``).
    set_task_identity : bool, default True
        Set the process-wide ``TaskIdentity`` to the server side (task 1, ``run_id``,
        ``SUPERLINK_NODE_ID``) on construction, so that ServerApp code can build
        ``Message(content, dst_node_id, message_type)``. :meth:`close` (or leaving the
        ``with`` block) restores the previous identity.

    Attributes
    ----------
    sent : list[Delivery]
        Every delivered instruction, in delivery order (dropped ones included).
    dropped : list[Delivery]
        Deliveries whose reply was lost.
    errors : list[tuple[int, Exception]]
        ``(node_id, exception)`` for every exception raised by the ClientApp (each
        became an error reply).
    rejected : list[Rejection]
        Replies that the SuperLink would have refused (e.g. not a reply to the
        instruction, wrong source node) or that could not be serialized; like over
        the wire, they never reach the server.

    Notes
    -----
    * ``Context`` semantics follow Flower's deployment runtime: one ``Context`` per
      node, persisting across messages and rounds; changes a handler makes to
      ``context.state`` are kept even when it raises (Flower's SuperNode stores the
      context it gets back in both cases; the Ray simulation backend would discard it).
    * While a handler runs, ``TaskIdentity`` is that of the node (``node_id`` = the
      node, a fresh ``task_id`` per delivery); it is restored afterwards.
    * Not thread-safe (nor is ``TaskIdentity``): drive a grid from one thread.
    """

    _create_message_warned = False

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        node_config_fn: NodeConfigFn | None = None,
        run_id: int = 1,
        seed: int = 0,
        drop: DropFn | None = None,
        copy_messages: bool = True,
        copy_mode: Literal["records", "wire"] = "records",
        run_config: dict[str, Any] | None = None,
        message_hook: MessageHook | None = None,
        drop_reply: Literal["lost", "node_unavailable"] = "lost",
        set_task_identity: bool = True,
    ) -> None:
        if not isinstance(client_app, ClientApp):
            raise TypeError(f"client_app must be a ClientApp, got {type(client_app).__name__}")
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        if copy_mode not in ("records", "wire"):
            raise ValueError(f"copy_mode must be 'records' or 'wire', got {copy_mode!r}")
        if drop_reply not in ("lost", "node_unavailable"):
            raise ValueError(f"drop_reply must be 'lost' or 'node_unavailable', got {drop_reply!r}")

        self._client_app = client_app
        self._copy = copy_messages
        self._wire = copy_mode == "wire"
        self._message_hook = message_hook
        self._drop_reply = drop_reply
        self._drop_rules = DropRules(drop)
        self._task_ids = itertools.count(SERVER_TASK_ID + 1)

        config = dict(run_config or {})
        run = Run.create_empty(run_id=run_id)
        run.override_config = dict(config)
        self._run = run

        # Every ClientApp here is a simulated site: mark the process so that the
        # malicious server model may use the simulation roster (fl_app.secagg.signing).
        from fl_app.secagg.signing import start_simulation_roster

        start_simulation_roster()
        self._node_ids = make_node_ids(num_nodes, seed)
        self._contexts = make_contexts(self._node_ids, run_id, node_config_fn, config)
        self._inbox = ReplyInbox()

        self.sent: list[Delivery] = []
        self.dropped: list[Delivery] = []
        self.errors: list[tuple[int, Exception]] = []
        self.rejected: list[Rejection] = []

        self._saved_identity: Identity | None = None
        if set_task_identity:
            self._saved_identity = get_identity()
            set_identity(self._server_identity())

    # ------------------------------------------------------------------ identity
    def _server_identity(self) -> Identity:
        return (SERVER_TASK_ID, self._run.run_id, SUPERLINK_NODE_ID)

    @contextmanager
    def server_identity(self) -> Iterator[None]:
        """Context manager: set the server-side ``TaskIdentity``, restore it after.

        Yields
        ------
        None
        """
        previous = get_identity()
        set_identity(self._server_identity())
        try:
            yield
        finally:
            set_identity(previous)

    def close(self) -> None:
        """Restore the ``TaskIdentity`` that was in place before construction.

        Idempotent; a no-op when built with ``set_task_identity=False``.
        """
        if self._saved_identity is not None:
            set_identity(self._saved_identity)
            self._saved_identity = None

    def __enter__(self) -> InProcessGrid:
        """Return ``self``; leaving the block calls :meth:`close`."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Call :meth:`close`."""
        self.close()

    # ----------------------------------------------------------------- nodes
    @property
    def node_ids(self) -> list[int]:
        """Node ids in partition order (``node_ids[i]`` has ``partition-id`` ``i``)."""
        return list(self._node_ids)

    def context(self, node_id: int) -> Context:
        """Return the live, persistent ``Context`` of ``node_id``.

        Parameters
        ----------
        node_id : int
            A node of this grid.

        Returns
        -------
        Context
            The node's context (mutable; changes are seen by the ClientApp).

        Raises
        ------
        KeyError
            If ``node_id`` is not a node of this grid.
        """
        try:
            return self._contexts[node_id]
        except KeyError:
            raise KeyError(f"Unknown node id {node_id}") from None

    # ------------------------------------------------------------- Grid API
    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in (updates every node's ``run_id``).

        Parameters
        ----------
        run : Run
            The new run.

        Raises
        ------
        TypeError
            If ``run`` is not a :class:`~flwr.supercore.run.Run`.
        """
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        for ctx in self._contexts.values():
            ctx.run_id = run.run_id
        if self._saved_identity is not None:
            set_identity(self._server_identity())

    @property
    def run(self) -> Run:
        """A copy of the :class:`~flwr.supercore.run.Run` (like Flower's grids)."""
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction (deprecated in Flower; use the ``Message`` constructor).

        Parameters
        ----------
        content : RecordDict
            Content of the message.
        message_type : str
            Message type, e.g. ``"train"``.
        dst_node_id : int
            Destination node.
        group_id : str
            Group id (e.g. the round).
        ttl : float, optional
            Time to live in seconds; Flower's default when ``None``.

        Returns
        -------
        Message
            The new message.
        """
        if not InProcessGrid._create_message_warned:
            InProcessGrid._create_message_warned = True
            _LOG.warning(
                "`Grid.create_message` is deprecated. Use the `Message` constructor instead."
            )
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Return the node ids (partition order).

        Returns
        -------
        list[int]
            A new list with every node id.
        """
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver instructions, run the ClientApp on each node, queue the replies.

        All messages are validated (and, with ``copy_messages``, serialized) before
        any is delivered; nodes then run in order. Each message gets a fresh UUID
        ``message_id`` (written into its metadata, like ``InMemoryGrid``).

        Parameters
        ----------
        messages : Iterable[Message]
            Instructions (no ``reply_to``), each to a node of this grid.

        Returns
        -------
        list[str]
            The message ids, in input order.

        Raises
        ------
        TypeError
            If an item is not a ``Message``.
        ValueError
            If a message is invalid, is pushed twice in one call, or is addressed to
            an unknown node.
        """
        batch = list(messages)
        seen: set[int] = set()
        message_ids: list[str] = []
        for message in batch:
            if not isinstance(message, Message):
                raise TypeError(f"Expected a Message, got {type(message).__name__}")
            if id(message) in seen:
                raise ValueError("The same Message object was pushed twice in one call")
            seen.add(id(message))
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            check_instruction(message, self._contexts, self._run.run_id)
            message_ids.append(message_id)

        # Every instruction is serialized before any ClientApp runs (see batch_copies).
        if not self._copy:
            delivered: Iterable[Message] = batch
        else:
            delivered = batch_copies(batch, message_ids, wire=self._wire)
        for message, message_id, copy in zip(batch, message_ids, delivered, strict=True):
            self._deliver(message, copy, message_id)
        return message_ids

    def _deliver(self, message: Message, delivered: Message, message_id: str) -> None:
        """Run the ClientApp of the destination node and queue its (copied) reply."""
        node_id = message.metadata.dst_node_id
        delivery = Delivery(node_id, message.metadata.message_type, message.metadata.group_id)
        self.sent.append(delivery)
        lost = self._drop_rules.should_drop(node_id, message)

        reply = self._run_client_app(node_id, delivered)
        if lost:
            self.dropped.append(delivery)
            if self._drop_reply == "node_unavailable":
                unavailable = create_message_error_unavailable_res_message(
                    message.metadata, "node_unavail"
                )
                self._inbox.put(message_id, unavailable)
            return

        accepted = self._accept_reply(node_id, message, reply)
        if accepted is None:
            return
        if self._message_hook is None:
            self._inbox.put(message_id, accepted)
            return
        hooked = self._message_hook(node_id, accepted)
        if hooked is None:
            return
        for item in [hooked] if isinstance(hooked, Message) else hooked:
            if not item.metadata.message_id:
                item.metadata.__dict__["_message_id"] = str(uuid4())
            self._inbox.put(message_id, item)

    def _run_client_app(self, node_id: int, message: Message) -> Message:
        """Call the ClientApp as a node would; exceptions become error replies."""
        identity = (next(self._task_ids), self._run.run_id, node_id)
        reply, ex = run_client_app(self._client_app, self._contexts[node_id], message, identity)
        if ex is not None:
            _LOG.warning("ClientApp on node %d raised %r", node_id, ex)
            self.errors.append((node_id, ex))
        return reply

    def _accept_reply(self, node_id: int, instruction: Message, reply: Message) -> Message | None:
        """SuperLink side: validate, assign an id and copy a reply; ``None`` if refused."""
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        reasons = reply_problems(node_id, instruction, reply)
        if not reasons and self._copy:
            try:
                reply = wire_copy(reply) if self._wire else records_copy(reply)
            except Exception as ex:
                reasons.append(f"cannot serialize reply: {exception_reason(ex)}")
        if reasons:
            _LOG.error("Reply from node %d rejected: %s", node_id, "; ".join(reasons))
            self.rejected.append(Rejection(node_id, reply, reasons))
            return None
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Return queued replies to ``message_ids`` (each reply only once).

        Parameters
        ----------
        message_ids : Iterable[str]
            Ids of instructions whose replies to collect.

        Returns
        -------
        list[Message]
            Replies in arrival order, plus injected ``match_any`` replies.
        """
        return self._inbox.pull(message_ids)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> list[Message]:
        """Push ``messages`` and return their replies, without ever sleeping.

        The grid is synchronous: when :meth:`push_messages` returns, every reply that
        will ever arrive is queued. Missing (dropped) replies are simply absent, even
        with ``timeout=None`` (where a real SuperLink would wait forever).

        Parameters
        ----------
        messages : Iterable[Message]
            Instructions to send.
        timeout : float, optional
            Accepted for API compatibility; not needed (nothing to wait for).

        Returns
        -------
        list[Message]
            The replies that arrived, in arrival order.
        """
        del timeout
        return self.pull_messages(self.push_messages(messages))
