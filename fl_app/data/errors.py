"""The one exception type of the data package."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset problem the user can fix: a bad config value, node-config key or file.

    Every message names the config field (``dataset.<field>``), the SuperNode
    node-config key (``"data-path"``, ``"num-partitions"``) or the file at fault, and
    says what to change. It subclasses :class:`ValueError` so callers that already
    treat bad values uniformly keep working.
    """
