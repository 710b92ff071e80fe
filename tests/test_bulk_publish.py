"""Bulk publishing (llmpulse/streams/bulk_publish.py) on the real broker: keyed records land
in the partition Kafka's default partitioner gives their key (checked against librdkafka's
Java-compatible murmur2 partitioner, not our own), explicit partitions are kept, and each
partition holds its records in call order, across several batches."""

from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer

from llmpulse.config import Settings
from llmpulse.kafka.clients import produce_all
from llmpulse.streams.bulk_publish import Record, publish_bulk
from tests.kafkatools import read_messages


def test_records_land_where_the_default_partitioner_puts_their_key_in_call_order(settings: Settings) -> None:
    bootstrap = settings.kafka.bootstrap_servers()
    topic, reference = settings.kafka.topic("aggregates"), settings.kafka.topic("alerts")
    partitions = settings.kafka.partitions
    assert partitions > 1
    keys = [f"calls|60|{1700000000000 + 60000 * (i // 7)}|model=m{i % 7}".encode() for i in range(3000)]
    records: list[Record] = [(None, k, json.dumps({"seq": i}).encode()) for i, k in enumerate(keys)]
    records += [(partitions - 1, b"pinned", json.dumps({"seq": 3000 + i}).encode()) for i in range(5)]

    async def publish() -> int:
        # small batches: a partition's records span several of them
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=16384, linger_ms=5)
        await producer.start()
        try:
            futures = await publish_bulk(producer, topic, records)
            await asyncio.gather(*futures)
            return len(futures)
        finally:
            await producer.stop()

    batches = asyncio.run(publish())
    assert batches > partitions  # more than one batch per partition
    ref = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "log_level": 3})
    assert produce_all(ref, ((reference, k, b"") for k in keys), 30)[1] == 0

    got = read_messages(bootstrap, topic, expect=len(records), timeout=60)
    want = read_messages(bootstrap, reference, expect=len(keys), timeout=60)
    assert len(got) == len(records) and len(want) == len(keys)
    expected_partition = {m.key(): m.partition() for m in want}
    by_partition: dict[int, list[int]] = {}
    for m in got:
        seq = json.loads(m.value())["seq"]
        if m.key() == b"pinned":
            assert m.partition() == partitions - 1
        else:
            assert m.partition() == expected_partition[m.key()], m.key()
        by_partition.setdefault(m.partition(), []).append(seq)
    assert len(by_partition) == partitions  # the keys spread over every partition
    for seqs in by_partition.values():
        assert seqs == sorted(seqs)  # call order within a partition


def test_our_murmur2_is_the_one_kafka_clients_use_for_every_length() -> None:
    """bulk_publish.murmur2 reads words at once; aiokafka's reads bytes: the same hash, tails included."""
    import random

    from aiokafka.partitioner import murmur2 as reference

    from llmpulse.streams.bulk_publish import murmur2

    rng = random.Random(15)
    samples = [bytes(rng.randrange(256) for _ in range(n)) for n in range(0, 130) for _ in range(20)]
    samples += [b"\xff" * n for n in range(9)] + [b"calls|60", b"calls|10|1700000000000|model=gpt-4o"]
    assert [murmur2(s) for s in samples] == [reference(s) for s in samples]


def test_many_keys_hashed_at_once_are_each_keys_murmur2() -> None:
    """murmur2_many (numpy: one 4-byte word of every key per step, keys ordered by length) gives
    murmur2 of each key, in the keys' order: lengths 0..80 mixed, every tail, few keys and many."""
    import random

    from llmpulse.streams.bulk_publish import murmur2, murmur2_many

    rng = random.Random(15)
    for n in [0, 1, 47, 48, 49, 300, 2000]:
        keys = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))) for _ in range(n)]
        assert murmur2_many(keys).tolist() == [murmur2(k) for k in keys], n
    for length in range(81):  # one length at a time: every key has the same words and tail
        keys = [bytes(rng.randrange(256) for _ in range(length)) for _ in range(60)]
        assert murmur2_many(keys).tolist() == [murmur2(k) for k in keys], length
    keys = [b"\xff" * rng.randint(0, 80) for _ in range(100)]  # the largest words: no overflow
    keys += [f"calls|10|{1700000000000 + 10000 * i}|model=m{i % 7}".encode() for i in range(100)]
    assert murmur2_many(keys).tolist() == [murmur2(k) for k in keys]


def test_a_key_gets_the_partition_of_kafkas_default_partitioner_one_by_one_or_many_at_once() -> None:
    """partition_of_hash, over one hash (default_partition, finalizer_partition) or publish_bulk's
    array of them, places every key where aiokafka's DefaultPartitioner does: few partitions and
    many, hashes with the top bit set (the one the mask drops), few keys and many."""
    import random

    from aiokafka.partitioner import DefaultPartitioner

    from llmpulse.streams.bulk_publish import default_partition, murmur2_many, partition_of_hash

    rng = random.Random(15)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))) for _ in range(3000)]
    keys += [f"calls|10|{1700000000000 + 10000 * i}|model=m{i % 7}".encode() for i in range(1000)]
    assert {h >> 31 for h in murmur2_many(keys).tolist()} == {0, 1}
    for n in [1, 2, 3, 7, 12, 16, 100, 2**31 - 1]:
        want = [DefaultPartitioner()(k, range(n), []) for k in keys]
        assert [default_partition(k, n) for k in keys] == want, n
        for few in (keys[:5], keys[:47]):  # below numpy's threshold: hashed one by one
            assert partition_of_hash(murmur2_many(few), n).tolist() == want[: len(few)], n
        assert partition_of_hash(murmur2_many(keys), n).tolist() == want, n
