"""The in-memory event log every reader produces and the sequence store consumes."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import pyarrow as pa
import pyarrow.compute as pc

from torchrec_genrec.data.errors import DataError

#: Column names of an interactions table. ``action`` is optional.
USER, ITEM, TIMESTAMP, ACTION = "user", "item", "timestamp", "action"


@dataclasses.dataclass
class Interactions:
    """An event log: one row per (user, item, timestamp[, action]) event, raw ids.

    Args:
        events (pa.Table): columns ``user`` and ``item`` (int64 or string raw ids),
            ``timestamp`` (int64, any unit, larger = later) and optionally ``action``
            (int64, float64 or string: a rating, an event type, ...). Other columns are
            ignored by the sequence store.
        source (str): where the events came from, e.g. ``"movielens-100k (recbole 1.2.1)"``.
        item_features (Optional[pa.Table]): one row per item, keyed by column ``item``
            (same raw ids and type as ``events["item"]``), any other feature columns.
        user_features (Optional[pa.Table]): one row per user, keyed by column ``user``.
        action_name (str): what ``action`` means, e.g. ``"rating"``.
        timestamp_unit (str): unit of ``timestamp``, e.g. ``"s"``.
        files (Dict[str, str]): logical name -> path of the files that were read.

    Example::

        events = pa.table({"user": [1, 1, 2], "item": [10, 11, 10],
                           "timestamp": [5, 6, 5], "action": [4.0, 3.0, 5.0]})
        Interactions(events, source="example", action_name="rating").validate()
    """

    events: pa.Table
    source: str
    item_features: Optional[pa.Table] = None
    user_features: Optional[pa.Table] = None
    action_name: str = "action"
    timestamp_unit: str = "s"
    files: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def has_action(self) -> bool:
        return ACTION in self.events.column_names

    @property
    def num_events(self) -> int:
        return self.events.num_rows

    def validate(self) -> "Interactions":
        """Checks columns and types; raises :class:`DataError` naming the source."""
        names = self.events.column_names
        missing = [c for c in (USER, ITEM, TIMESTAMP) if c not in names]
        if missing:
            raise DataError(f"events lack column(s) {missing}; they have {names}", path=self.source)
        if self.events.num_rows == 0:
            raise DataError("the dataset has no events; check the file and its delimiter", path=self.source)
        for col in (USER, ITEM):
            t = self.events.schema.field(col).type
            if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise DataError(f"column {col!r} must hold integer or string ids, not {t}", path=self.source)
        t = self.events.schema.field(TIMESTAMP).type
        if not pa.types.is_integer(t):
            raise DataError(f"column 'timestamp' must be integer, not {t}", path=self.source)
        for col in names:
            if self.events.column(col).null_count:
                raise DataError(
                    f"column {col!r} has {self.events.column(col).null_count} empty values", path=self.source
                )
        if self.has_action and pa.types.is_floating(self.events.schema.field(ACTION).type):
            nan = pc.sum(pc.is_nan(self.events.column(ACTION))).as_py() or 0
            if nan:
                raise DataError(f"column 'action' has {nan} NaN values", path=self.source)
        for table, key in ((self.item_features, ITEM), (self.user_features, USER)):
            if table is not None and key not in table.column_names:
                raise DataError(f"{key} feature table lacks its key column {key!r}", path=self.source)
        return self
