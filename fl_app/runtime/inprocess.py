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
the server receives are independent copies made through Flower's serialization, so
mutations on one side never leak to the other and content that cannot be serialized
fails as it would over the wire. Two copy modes exist:

``copy_mode="records"`` (default, fast)
    :func:`records_copy`: metadata and errors through Flower's protobuf serde,
    ``ConfigRecord``/``MetricRecord`` through their own wire ``deflate``/``inflate``,
    each ``Array`` rebuilt over its immutable ``bytes`` payload. About 35 us per
    message; 1,000 nodes per round in ~0.2-0.3 s with a 20k-float model.
``copy_mode="wire"`` (exact)
    :func:`wire_copy`: the full *inflatable object* path that SuperLink, SuperNode
    and ClientApp process use in Flower 1.41 (``Message``/``RecordDict``/
    ``ArrayRecord``/``Array``/``ArrayChunk``/... ``deflate`` to bytes, SHA-256
    object ids, ``inflate_object_from_contents``). Byte-for-byte what a transfer
    does, including its content-addressed de-duplication (identical records or
    arrays in one message arrive as one shared object), but ~250 us per message,
    i.e. ~0.5-0.8 s per 1,000-node round trip.

Client-side exceptions become error replies exactly as Flower's SuperNode runtime
builds them (``flwr/supernode/runtime/run_clientapp.py``: code
``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason ``"<class 'X'>:<'msg'>"``); they
never propagate to the server.

Examples
--------
>>> grid = InProcessGrid(client_app, num_nodes=10)  # doctest: +SKIP
>>> result = FedAvg().start(grid=grid, initial_arrays=arrays, num_rounds=2)  # doctest: +SKIP
>>> grid.close()  # restore the process-wide TaskIdentity  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, cast
from uuid import uuid4

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.common.serde_utils import (
    error_from_proto,
    error_to_proto,
    metadata_from_proto,
    metadata_to_proto,
)
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.server.utils.validator import validate_message
from flwr.serverapp.grid import Grid
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "Delivery",
    "DropFn",
    "InProcessGrid",
    "MessageHook",
    "NodeConfigFn",
    "Rejection",
    "records_copy",
    "wire_copy",
]

_LOG = logging.getLogger(__name__)

#: ``node_config_fn(partition_id, num_nodes) -> node_config``.
NodeConfigFn = Callable[[int, int], dict[str, Any]]
#: ``drop(node_id, instruction) -> bool``; ``True`` loses that node's reply.
DropFn = Callable[[int, Message], bool]
#: ``message_hook(node_id, reply) -> replacement``: a ``Message``, several, or ``None``.
MessageHook = Callable[[int, Message], "Message | Sequence[Message] | None"]

#: Task id the server side uses, like Flower's legacy simulation entry points.
_SERVER_TASK_ID = 1
_MAX_NODE_ID = 2**63 - 1


class Delivery(NamedTuple):
    """One instruction delivered to a node (an entry of :attr:`InProcessGrid.sent`).

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


@dataclass
class _DropRule:
    """State of one :meth:`InProcessGrid.drop_at` rule."""

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


def _make_node_ids(num_nodes: int, seed: int) -> list[int]:
    """Draw ``num_nodes`` distinct node ids in ``[2, 2**63 - 1]``.

    ``0`` is "unset" and ``1`` is ``SUPERLINK_NODE_ID`` in Flower, so both are excluded.
    """
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < num_nodes:
        draw = rng.integers(
            SUPERLINK_NODE_ID + 1,
            _MAX_NODE_ID,
            size=num_nodes - len(ids),
            dtype=np.int64,
            endpoint=True,
        )
        for value in draw.tolist():
            if value not in seen:
                seen.add(value)
                ids.append(int(value))
    return ids


def _deflate_into(message: Message, contents: dict[str, bytes]) -> str:
    """Deflate ``message`` and its descendants into ``contents``; return its object id.

    Must run inside :func:`~flwr.supercore.inflatable.inflatable_object.no_object_id_recompute`
    so that object ids of shared sub-trees are computed once. Objects already present in
    ``contents`` (content-addressed) are not deflated again.
    """
    objects = get_all_nested_objects(message)
    for object_id, obj in objects.items():
        if object_id not in contents:
            contents[object_id] = obj.deflate()
    # Post-order traversal: the root (the message itself) is the last entry.
    return next(reversed(objects))


def _inflate_message(root_id: str, contents: dict[str, bytes], message_id: str) -> Message:
    """Rebuild a fresh ``Message`` (no object shared with any other) from ``contents``."""
    obj: InflatableObject = inflate_object_from_contents(
        root_id, contents, keep_object_contents=True
    )
    message = cast(Message, obj)
    # The wire format excludes the message id (it is the SuperLink's business).
    message.metadata.__dict__["_message_id"] = message_id
    return message


def wire_copy(message: Message) -> Message:
    """Return a deep copy of ``message`` made with Flower's wire serialization.

    The message and every nested object (``RecordDict``, records, ``Array``,
    ``ArrayChunk``) are deflated to bytes and inflated again, as between SuperLink,
    SuperNode and ClientApp. Metadata is preserved, including ``message_id`` (which the
    wire format itself does not carry).

    Parameters
    ----------
    message : Message
        The message to copy.

    Returns
    -------
    Message
        An independent copy.

    Raises
    ------
    Exception
        Whatever Flower's serialization raises for content that cannot be sent.
    """
    contents: dict[str, bytes] = {}
    with no_object_id_recompute():
        root_id = _deflate_into(message, contents)
    return _inflate_message(root_id, contents, message.metadata.message_id)


def _copy_array_record(record: ArrayRecord) -> ArrayRecord:
    """Copy an ``ArrayRecord``: new ``Array`` objects over the (immutable) data bytes."""
    out = ArrayRecord()
    for key, array in record.items():
        data = array.data
        if not isinstance(data, bytes):  # e.g. a bytearray set after construction
            data = bytes(data)
        # ``Array.__init__`` type-checks dtype/shape/stype/data like the wire would.
        out[key] = Array(array.dtype, tuple(array.shape), array.stype, data)
    return out


def records_copy(message: Message) -> Message:
    """Return a deep copy of ``message``, record by record (fast, faithful).

    A lighter alternative to :func:`wire_copy` that skips the content-addressed
    object tree (SHA-256 of every object, chunking, header parsing):

    * metadata and error go through Flower's protobuf serde
      (``metadata_to_proto``/``metadata_from_proto``, ``error_to_proto``/
      ``error_from_proto``);
    * ``ConfigRecord`` and ``MetricRecord`` go through their own wire
      ``deflate``/``inflate`` (protobuf), so unserializable values fail as they would
      over the wire;
    * each ``Array`` is rebuilt with ``Array(dtype, shape, stype, data)``, sharing the
      *immutable* ``bytes`` payload (no copy is needed for isolation).

    Differences from :func:`wire_copy`: identical records/arrays inside one message
    stay distinct objects (the wire would alias them), and array payloads are not
    copied (they are immutable ``bytes``).

    Parameters
    ----------
    message : Message
        The message to copy.

    Returns
    -------
    Message
        An independent copy (``message_id`` preserved).
    """
    metadata = metadata_from_proto(metadata_to_proto(message.metadata))
    if message.has_error():
        error = error_from_proto(error_to_proto(message.error))
        return make_message(metadata=metadata, error=error)
    content = RecordDict()
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            content[name] = _copy_array_record(record)
        elif isinstance(record, ConfigRecord):
            content[name] = ConfigRecord.inflate(record.deflate())
        elif isinstance(record, MetricRecord):
            content[name] = MetricRecord.inflate(record.deflate())
        else:  # RecordDict type-checks its values, so this is unreachable in practice
            raise TypeError(f"Cannot serialize record of type {type(record).__name__}")
    return make_message(metadata=metadata, content=content)


def _exception_reason(ex: BaseException) -> str:
    """Format ``ex`` like Flower's SuperNode runtime (``run_clientapp.py``)."""
    return str(type(ex)) + ":<'" + str(ex) + "'>"


_Identity = tuple[int | None, int | None, int | None]


def _get_identity() -> _Identity:
    """Return the raw ``TaskIdentity`` (``None`` where unset, no error)."""
    return (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)


def _set_identity(identity: _Identity) -> None:
    """Set the raw ``TaskIdentity`` (``None`` allowed, i.e. unset)."""
    # mypy infers ``int`` from the metaclass setters (``cls._task_id = value``); the
    # class attributes are really ``int | None``.
    task_id, run_id, node_id = identity
    TaskIdentity._task_id = task_id  # type: ignore[assignment]
    TaskIdentity._run_id = run_id  # type: ignore[assignment]
    TaskIdentity._node_id = node_id  # type: ignore[assignment]


class InProcessGrid(Grid):
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
        self._drop = drop
        self._copy = copy_messages
        self._wire = copy_mode == "wire"
        self._message_hook = message_hook
        self._drop_reply = drop_reply
        self._drop_rules: list[_DropRule] = []
        self._task_ids = itertools.count(_SERVER_TASK_ID + 1)

        config = dict(run_config or {})
        run = Run.create_empty(run_id=run_id)
        run.override_config = dict(config)
        self._run = run

        # Every ClientApp here is a simulated site: mark the process so that the
        # malicious server model may use the simulation roster (fl_app.secagg.signing).
        from fl_app.secagg.signing import start_simulation_roster

        start_simulation_roster()
        self._node_ids = _make_node_ids(num_nodes, seed)
        self._contexts: dict[int, Context] = {}
        for partition_id, node_id in enumerate(self._node_ids):
            if node_config_fn is None:
                node_config: dict[str, Any] = {
                    PARTITION_ID_KEY: partition_id,
                    NUM_PARTITIONS_KEY: num_nodes,
                }
            else:
                node_config = dict(node_config_fn(partition_id, num_nodes))
            self._contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(config),
            )

        # Replies waiting to be pulled, in arrival order: (instruction id, reply).
        # An instruction id of ``None`` means "returned by the next pull, any ids".
        self._inbox: list[tuple[str | None, Message]] = []

        self.sent: list[Delivery] = []
        self.dropped: list[Delivery] = []
        self.errors: list[tuple[int, Exception]] = []
        self.rejected: list[Rejection] = []

        self._saved_identity: _Identity | None = None
        if set_task_identity:
            self._saved_identity = _get_identity()
            _set_identity(self._server_identity())

    # ------------------------------------------------------------------ identity
    def _server_identity(self) -> _Identity:
        return (_SERVER_TASK_ID, self._run.run_id, SUPERLINK_NODE_ID)

    @contextmanager
    def server_identity(self) -> Iterator[None]:
        """Context manager: set the server-side ``TaskIdentity``, restore it after.

        Yields
        ------
        None
        """
        previous = _get_identity()
        _set_identity(self._server_identity())
        try:
            yield
        finally:
            _set_identity(previous)

    def close(self) -> None:
        """Restore the ``TaskIdentity`` that was in place before construction.

        Idempotent; a no-op when built with ``set_task_identity=False``.
        """
        if self._saved_identity is not None:
            _set_identity(self._saved_identity)
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

    # --------------------------------------------------------- fault injection
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
        if nth < 1:
            raise ValueError(f"nth must be >= 1, got {nth}")
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1 or None, got {count}")
        self._drop_rules.append(
            _DropRule(
                node_id=node_id,
                message_type=message_type,
                group_id=None if group_id is None else str(group_id),
                nth=nth,
                count=count,
            )
        )

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
        self._inbox.append((key, message))

    def _should_drop(self, node_id: int, message: Message) -> bool:
        # Evaluate every rule so that each one counts its matches.
        dropped = False
        for rule in self._drop_rules:
            dropped = rule.should_drop(node_id, message) or dropped
        if self._drop is not None and self._drop(node_id, message):
            dropped = True
        return dropped

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
            _set_identity(self._server_identity())

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

    def _check_message(self, message: Message) -> None:
        """Validate an instruction like ``InMemoryGrid`` + ``LinkState`` (but raise)."""
        meta = message.metadata
        if not (
            meta.message_id != ""
            and meta.reply_to_message_id == ""
            and meta.ttl > 0
            and meta.delivered_at == ""
        ):
            raise ValueError(f"Invalid message: {message}")
        if meta.dst_node_id not in self._contexts:
            raise ValueError(f"Unknown destination node id {meta.dst_node_id}")
        if meta.run_id != self._run.run_id:
            raise ValueError(
                f"Message run_id {meta.run_id} != grid run_id {self._run.run_id} "
                "(is TaskIdentity set by another grid?)"
            )
        errors = validate_message(message, is_reply_message=False)
        if errors:
            raise ValueError(f"Invalid message ({'; '.join(errors)}): {message}")

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
            self._check_message(message)
            message_ids.append(message_id)

        # Server side of the wire: deflate everything before any ClientApp runs, so a
        # payload shared by all messages (as in Flower's strategies) is serialized once.
        contents: dict[str, bytes] = {}
        roots: list[str] = []
        if self._copy and self._wire:
            with no_object_id_recompute():
                roots = [_deflate_into(message, contents) for message in batch]
        elif self._copy:
            # Serialize everything first too, so that a bad message fails the push
            # before any node ran.
            copies = [records_copy(message) for message in batch]

        for index, (message, message_id) in enumerate(zip(batch, message_ids, strict=True)):
            if not self._copy:
                delivered = message
            elif self._wire:
                delivered = _inflate_message(roots[index], contents, message_id)
            else:
                delivered = copies[index]
            self._deliver(message, delivered, message_id)
        return message_ids

    def _deliver(self, message: Message, delivered: Message, message_id: str) -> None:
        """Run the ClientApp of the destination node and queue its (copied) reply."""
        node_id = message.metadata.dst_node_id
        delivery = Delivery(node_id, message.metadata.message_type, message.metadata.group_id)
        self.sent.append(delivery)
        lost = self._should_drop(node_id, message)

        reply = self._run_client_app(node_id, delivered)
        if lost:
            self.dropped.append(delivery)
            if self._drop_reply == "node_unavailable":
                self._inbox.append(
                    (
                        message_id,
                        create_message_error_unavailable_res_message(
                            message.metadata, "node_unavail"
                        ),
                    )
                )
            return

        accepted = self._accept_reply(node_id, message, reply)
        if accepted is None:
            return
        if self._message_hook is None:
            self._inbox.append((message_id, accepted))
            return
        hooked = self._message_hook(node_id, accepted)
        if hooked is None:
            return
        for item in [hooked] if isinstance(hooked, Message) else hooked:
            if not item.metadata.message_id:
                item.metadata.__dict__["_message_id"] = str(uuid4())
            self._inbox.append((message_id, item))

    def _run_client_app(self, node_id: int, message: Message) -> Message:
        """Call the ClientApp as a node would; exceptions become error replies."""
        previous = _get_identity()
        _set_identity((next(self._task_ids), self._run.run_id, node_id))
        try:
            try:
                reply = self._client_app(message=message, context=self._contexts[node_id])
                if not isinstance(reply, Message):
                    raise TypeError(
                        f"ClientApp returned {type(reply).__name__}, expected a Message"
                    )
            except Exception as ex:
                _LOG.warning("ClientApp on node %d raised %r", node_id, ex)
                self.errors.append((node_id, ex))
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=_exception_reason(ex)),
                    reply_to=message,
                )
        finally:
            _set_identity(previous)
        return reply

    def _accept_reply(self, node_id: int, instruction: Message, reply: Message) -> Message | None:
        """SuperLink side: validate, assign an id and copy a reply; ``None`` if refused."""
        reply.metadata.__dict__["_message_id"] = str(uuid4())
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
        if not reasons and self._copy:
            try:
                reply = wire_copy(reply) if self._wire else records_copy(reply)
            except Exception as ex:
                reasons.append(f"cannot serialize reply: {_exception_reason(ex)}")
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
        wanted = set(message_ids)
        out: list[Message] = []
        keep: list[tuple[str | None, Message]] = []
        for key, reply in self._inbox:
            if key is None or key in wanted:
                out.append(reply)
            else:
                keep.append((key, reply))
        self._inbox = keep
        return out

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
