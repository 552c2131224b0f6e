"""What a secure-aggregation round binds its clients to, computed on the server side.

Both are derived from the instructions the driver sends (every client of a round gets the
same run-wide spec and the same stage-3 terms), so an honest round agrees with each
client's own computation; a client told anything else is left out of the sum
(docs: README "Faulty clients and a deviating server").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import Message, RecordDict

from fl_app.protocol import CONFIG_KEY, SPEC_KEY
from fl_app.secagg.protocol import spec_binding
from fl_app.secagg.terms import content_terms

__all__ = ["one_terms", "spec_bind"]


def spec_bind(instructions: Sequence[Message]) -> bytes | None:
    """:func:`~fl_app.secagg.protocol.spec_binding` of the client spec the round's
    instructions carry (None where they carry none, e.g. a test's fixed-update clients).
    Every instruction carries the run's one spec; two different ones are a server bug."""
    specs = set()
    for m in instructions:
        config = m.content.config_records.get(CONFIG_KEY)
        spec = config.get(SPEC_KEY) if config is not None else None
        specs.add(spec if isinstance(spec, str) else None)
    if len(specs) > 1:
        raise ValueError("the round's instructions carry different client specs")
    spec = next(iter(specs), None)
    return spec_binding(spec) if spec is not None else None


def one_terms(contents: Iterable[RecordDict]) -> bytes:
    """The round terms (fl_app.secagg.terms) every stage-3 instruction carries; the
    server unmasks under them. Two different ones are a server bug."""
    terms = {content_terms(c) for c in contents}
    if len(terms) > 1:
        raise ValueError("the round's stage-3 instructions carry different round terms")
    return next(iter(terms), b"")
