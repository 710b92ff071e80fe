"""A Faust table whose keys say which changelog partition they belong to.

Window state must live in the changelog partition of the source partition it was
computed from, so that whoever is assigned that source partition after a rebalance
or restart recovers exactly that state. Keys are text `"<partition>|..."`.
"""

from __future__ import annotations

from typing import Any

import faust


class PartitionedTable(faust.Table):  # type: ignore[misc,type-arg]
    def partition_for_key(self, key: Any) -> int | None:
        return int(str(key).split("|", 1)[0])


def state_key(partition: int, *parts: object) -> str:
    return "|".join([str(partition), *(str(p) for p in parts)])
