"""Stage 1's input pieces without Kafka: the changelog-backed state and the commit ledger.

The contract they keep (llmpulse/streams/changelog_state.py, commits.py): state records
reach the changelog in the order they were made, in the partition their key names, in
the format restore.py reads; source offsets are committed only once the state that
covers them, and all state before it, has been delivered."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from llmpulse.streams.changelog_state import ChangelogState
from llmpulse.streams.commits import CommitLedger


class MemoryChangelog:
    """An in-memory emitter: records by partition, delivery futures completed on demand."""

    def __init__(self) -> None:
        self.records: dict[int, list[tuple[bytes, bytes | None]]] = {}
        self.futures: list[asyncio.Future[None]] = []

    async def publish(
        self, topic: str, records: list[tuple[int | None, bytes | None, bytes | None]]
    ) -> list[asyncio.Future[None]]:
        """Like bulk_publish.publish_bulk: one delivery per partition of the call."""
        assert topic == "w-changelog"
        futures: dict[int, asyncio.Future[None]] = {}
        for partition, key, value in records:
            assert partition is not None and key is not None
            self.records.setdefault(partition, []).append((key, value))
            if partition not in futures:
                futures[partition] = asyncio.get_running_loop().create_future()
        self.futures += futures.values()
        return list(futures.values())

    def state(self, partition: int) -> dict[str, Any]:
        """What restore.py would read back: the latest value of each live key."""
        out: dict[str, Any] = {}
        for key, value in self.records.get(partition, []):
            k = json.loads(key)
            if value is None:
                out.pop(k, None)
            else:
                out[k] = json.loads(value)
        return out


def test_changes_are_sent_in_order_to_the_partition_their_key_names() -> None:
    async def run() -> None:
        log = MemoryChangelog()
        state = ChangelogState("windows", "w-changelog")
        state["2|calls|A|100|x"] = {"o": 5, "a": [1, 2]}
        state["0|calls|M"] = {"o": 3}
        state["2|calls|M"] = {"o": 5}
        del state["2|calls|A|100|x"]
        assert "2|calls|A|100|x" not in state and "2|calls|M" in state
        assert log.records == {}  # nothing sent before flush
        futures = await state.flush(log.publish)
        assert futures == log.futures and len(futures) == 2 and state.queued == []  # one per partition
        assert [json.loads(k) for k, _ in log.records[2]] == ["2|calls|A|100|x", "2|calls|M", "2|calls|A|100|x"]
        assert log.state(2) == {"2|calls|M": {"o": 5}}
        assert log.state(0) == {"0|calls|M": {"o": 3}}
        assert await state.flush(log.publish) == []  # nothing queued twice

    asyncio.run(run())


def test_dropping_a_partition_forgets_it_in_memory_only() -> None:
    async def run() -> None:
        log = MemoryChangelog()
        state = ChangelogState("windows", "w-changelog")
        state["1|calls|M"] = {"o": 1}
        state["11|calls|M"] = {"o": 2}
        state.drop_partition(1)
        assert state.live == {"11|calls|M"}
        await state.flush(log.publish)
        assert log.state(1) == {"1|calls|M": {"o": 1}}  # the changelog keeps it for the next owner

    asyncio.run(run())


def test_values_are_held_only_from_a_restore_until_stage_1_loads_them() -> None:
    async def run() -> None:
        log = MemoryChangelog()
        state = ChangelogState("windows", "w-changelog")
        state["1|calls|A|100|x"] = {"o": 5, "a": [1, 2]}
        assert state.take_restored("1|") == []  # what the windows hold is not copied
        state["1|calls|M"] = {"o": 5}
        await state.flush(log.publish)
        state.restore(1, log.state(1))  # a restart reads its partition back
        assert state.live == {"1|calls|A|100|x", "1|calls|M"}
        assert state.take_restored("1|calls|M") == [("1|calls|M", {"o": 5})]
        assert state.take_restored("1|calls|M") == []  # handed over once
        del state["1|calls|A|100|x"]  # a close deletes a restored key: its tombstone is queued
        assert state.take_restored("1|") == [] and state.live == {"1|calls|M"}
        await state.flush(log.publish)
        assert log.state(1) == {"1|calls|M": {"o": 5}}

    asyncio.run(run())


def test_offsets_commit_only_after_their_state_and_all_earlier_state_is_delivered() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        ledger = CommitLedger()
        a, b, c = (loop.create_future() for _ in range(3))
        ledger.add([a], {("calls", 0): 10})
        ledger.add([b], {("calls", 0): 20, ("calls", 1): 7})
        ledger.add([c], {("calls", 1): 9})
        assert ledger.committable() == {}
        c.set_result(None)  # a later batch delivered first: it must still wait for the earlier ones
        assert ledger.committable() == {}
        a.set_result(None)
        assert ledger.committable() == {("calls", 0): 10}
        b.set_result(None)
        assert ledger.committable() == {("calls", 0): 20, ("calls", 1): 9}
        assert ledger.entries == [] and ledger.committable() == {}

    asyncio.run(run())


def test_a_failed_state_delivery_blocks_the_commit_and_is_raised() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        ledger = CommitLedger()
        bad = loop.create_future()
        ledger.add([bad], {("calls", 0): 10})
        bad.set_exception(RuntimeError("broker said no"))
        with pytest.raises(RuntimeError, match="broker said no"):
            ledger.committable()

    asyncio.run(run())


def test_revoked_partitions_are_not_committed_by_the_old_owner() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        ledger = CommitLedger()
        f = loop.create_future()
        ledger.add([f], {("calls", 0): 10, ("calls", 1): 4})
        ledger.forget([("calls", 0)])
        f.set_result(None)
        assert ledger.committable() == {("calls", 1): 4}

    asyncio.run(run())
