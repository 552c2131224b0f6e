"""Copies of a ``Message`` made through Flower's serialization (the in-process wire).

:class:`~fl_app.runtime.inprocess.InProcessGrid` hands every instruction and reply
across as such a copy, so that a mutation on one side never leaks to the other and
content that cannot be serialized fails as it would over the wire. Two copies exist:

:func:`records_copy` (the grid's default, fast)
    Metadata and errors through Flower's protobuf serde, ``ConfigRecord``/
    ``MetricRecord`` through their own wire ``deflate``/``inflate``, each ``Array``
    rebuilt over its immutable ``bytes`` payload. About 35 us per message; 1,000 nodes
    per round in ~0.2-0.3 s with a 20k-float model.
:func:`wire_copy` (exact)
    The full *inflatable object* path that SuperLink, SuperNode and ClientApp process
    use in Flower 1.41 (``Message``/``RecordDict``/``ArrayRecord``/``Array``/
    ``ArrayChunk``/... ``deflate`` to bytes, SHA-256 object ids,
    ``inflate_object_from_contents``). Byte-for-byte what a transfer does, including
    its content-addressed de-duplication (identical records or arrays in one message
    arrive as one shared object), but ~250 us per message, i.e. ~0.5-0.8 s per
    1,000-node round trip.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import cast

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.serde_utils import (
    error_from_proto,
    error_to_proto,
    metadata_from_proto,
    metadata_to_proto,
)
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

__all__ = ["batch_copies", "records_copy", "wire_copy"]


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


def batch_copies(
    batch: Sequence[Message], message_ids: Sequence[str], *, wire: bool
) -> Iterator[Message]:
    """The server side of the wire for one push: each node's copy of its instruction.

    Every message is serialized before this returns, so a message that cannot be sent
    fails the push before any node runs, and a payload shared by all messages (as in
    Flower's strategies) is deflated once. With ``wire`` each copy is inflated only
    when it is taken (just before its node runs), as a SuperNode would receive it;
    ``message_ids`` are the ids the copies carry (the wire format has none).
    """
    if wire:
        contents: dict[str, bytes] = {}
        with no_object_id_recompute():
            roots = [_deflate_into(message, contents) for message in batch]
        return (
            _inflate_message(root, contents, message_id)
            for root, message_id in zip(roots, message_ids, strict=True)
        )
    return iter([records_copy(message) for message in batch])
