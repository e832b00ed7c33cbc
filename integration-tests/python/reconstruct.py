#!/usr/bin/env python3
"""Rebuild tables from a pgferry topic with nothing but Confluent's Python client.

Reads every partition of a pgferry region topic from the beginning (read_committed, as
pgferry's exactly-once producer requires), decodes key and value with confluent-kafka's own
SchemaRegistryClient + AvroDeserializer against the registry's Confluent-compatible API,
applies the Debezium ops (c/u/d, r) and pgferry's Truncate records to an in-memory dict keyed
by primary key, and prints the reconstructed rows as JSON:

    {"public.items": [{"id": "1", "name": "apple", ...}, ...], ...}

Rows are sorted by primary key. Values are turned into a canonical form by their Debezium
logical name (`connect.name` in the writer schema), see docs/analytics.md:

    io.debezium.time.Date            int days since 1970-01-01 -> "YYYY-MM-DD"
    io.debezium.time.MicroTimestamp  long µs since 1970-01-01  -> "YYYY-MM-DDTHH:MM:SS.ffffff"
    io.debezium.time.ZonedTimestamp  ISO-8601 UTC string       -> "YYYY-MM-DDTHH:MM:SS.ffffffZ"
    io.debezium.time.MicroTime       long µs since midnight    -> "HH:MM:SS.ffffff"
    io.debezium.data.Json            string                    -> the parsed JSON value
    bytes                                                      -> "\\x<hex>" (PostgreSQL's form)
    boolean                                                    -> "true" / "false"
    int, long, float, double                                   -> str(value)
    any other string (numeric, text, uuid, interval, ...)      -> the string as it is

Non-change records share the partitions: `pgferry-kind` header `heartbeat` and `message` are
skipped, `truncate` (record pgferry.Truncate) empties that table, `change` is an Envelope.

    reconstruct.py --bootstrap HOST:PORT --registry URL/apis/ccompat/v7 --topic T [--table S.T ...]
"""

import argparse
import datetime as dt
import json
import struct
import sys

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

EPOCH = dt.datetime(1970, 1, 1)
EPOCH_DATE = dt.date(1970, 1, 1)
# pgferry writes ±infinity dates/timestamps as the integer extremes (docs/decisions.md).
INT_EXTREMES = {2**31 - 1: "infinity", -(2**31): "-infinity"}
LONG_EXTREMES = {2**63 - 1: "infinity", -(2**63): "-infinity"}


def canonical(value, connect_name):
    """One Avro value (as fastavro decoded it) -> the canonical form described above."""
    if value is None:
        return None
    if connect_name == "io.debezium.time.Date":
        if value in INT_EXTREMES:
            return INT_EXTREMES[value]
        return (EPOCH_DATE + dt.timedelta(days=value)).isoformat()
    if connect_name == "io.debezium.time.MicroTimestamp":
        if value in LONG_EXTREMES:
            return LONG_EXTREMES[value]
        return (EPOCH + dt.timedelta(microseconds=value)).strftime("%Y-%m-%dT%H:%M:%S.%f")
    if connect_name == "io.debezium.time.ZonedTimestamp":
        if value in ("infinity", "-infinity"):
            return value
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if connect_name == "io.debezium.time.MicroTime":
        secs, us = divmod(value, 1_000_000)
        return "%02d:%02d:%02d.%06d" % (secs // 3600, secs // 60 % 60, secs % 60, us)
    if connect_name == "io.debezium.data.Json":
        return json.loads(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, (int, float)):
        return str(value)
    return value


def connect_name(avro_type):
    """`connect.name` of a field's type, looking through a ["null", T] union."""
    if isinstance(avro_type, list):
        for t in avro_type:
            if t != "null":
                return connect_name(t)
        return None
    if isinstance(avro_type, dict):
        return avro_type.get("connect.name")
    return None


class Columns:
    """Column names and logical names of a table's Value record, from its writer schema."""

    def __init__(self, registry):
        self.registry = registry
        self.cache = {}

    def of(self, frame):
        """[(avro field, column name, connect.name)] of the Value record in a framed Envelope."""
        if len(frame) < 5 or frame[0] != 0:
            raise ValueError("not Confluent wire format (magic byte 0 + 4-byte schema id)")
        schema_id = struct.unpack(">I", frame[1:5])[0]
        if schema_id not in self.cache:
            envelope = json.loads(self.registry.get_schema(schema_id).schema_str)
            before = next(f for f in envelope["fields"] if f["name"] == "before")
            value = next(t for t in before["type"] if isinstance(t, dict))
            self.cache[schema_id] = [
                (f["name"], f.get("pgferry.column", f["name"]), connect_name(f["type"]))
                for f in value["fields"]
            ]
        return self.cache[schema_id]


def header(msg, name):
    for k, v in msg.headers() or []:
        if k == name:
            return v.decode() if v is not None else None
    return None


def read_all(args):
    """Yields every committed message of every partition of the topic, in partition order."""
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": "pgferry-reconstruct",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    metadata = consumer.list_topics(args.topic, timeout=10)
    topic = metadata.topics.get(args.topic)
    if topic is None or topic.error is not None or not topic.partitions:
        sys.exit(f"topic {args.topic} not found: {topic.error if topic else 'no metadata'}")
    partitions = sorted(topic.partitions)
    consumer.assign([TopicPartition(args.topic, p, 0) for p in partitions])
    at_end = set()
    try:
        while len(at_end) < len(partitions):
            msg = consumer.poll(args.timeout)
            if msg is None:
                sys.exit(f"no message or end of partition within {args.timeout} s")
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                    continue
                sys.exit(f"reading {args.topic}: {msg.error()}")
            at_end.discard(msg.partition())
            yield msg
    finally:
        consumer.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--registry", required=True, help="Confluent-compatible API, e.g. …/apis/ccompat/v7")
    p.add_argument("--topic", required=True)
    p.add_argument("--table", action="append", help="schema.table to keep (default: all)")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()

    registry = SchemaRegistryClient({"url": args.registry})
    # No reader schema: each datum is decoded with its writer schema, fetched by id.
    key_deserializer = AvroDeserializer(registry)
    value_deserializer = AvroDeserializer(registry)
    columns = Columns(registry)
    tables = {}  # "schema.table" -> {primary key tuple: row dict}
    counts = {}

    for msg in read_all(args):
        kind = header(msg, "pgferry-kind")
        counts[kind] = counts.get(kind, 0) + 1
        if kind in ("heartbeat", "message"):
            continue
        value_ctx = SerializationContext(msg.topic(), MessageField.VALUE, msg.headers())
        value = value_deserializer(msg.value(), value_ctx)
        if kind == "truncate":  # pgferry.Truncate
            name = f"{value['schema']}.{value['table']}"
            if not args.table or name in args.table:
                tables[name] = {}
            continue
        if kind != "change":
            sys.exit(f"unknown pgferry-kind {kind!r} at {msg.partition()}:{msg.offset()}")
        source = value["source"]
        name = f"{source['schema']}.{source['table']}"
        if args.table and name not in args.table:
            continue
        key_ctx = SerializationContext(msg.topic(), MessageField.KEY, msg.headers())
        key = key_deserializer(msg.key(), key_ctx)
        pk = tuple(key.values())
        rows = tables.setdefault(name, {})
        op = value["op"]
        if op in ("c", "u", "r"):
            after = value["after"]
            before = value["before"]
            if op == "u" and before is not None:
                # A primary-key change is one `u` event (Debezium would send `d` + `c`): the
                # message key is the new key, `before` holds the old one.
                old_pk = tuple(before[field] for field in key)
                if old_pk != pk:
                    rows.pop(old_pk, None)
            unchanged = set(source.get("unchanged_toast") or [])
            old = rows.get(pk, {})
            rows[pk] = {
                column: old.get(column) if column in unchanged else canonical(after[field], logical)
                for field, column, logical in columns.of(msg.value())
            }
        elif op == "d":
            rows.pop(pk, None)
        else:
            sys.exit(f"unknown op {op!r} at {msg.partition()}:{msg.offset()}")

    out = {name: [rows[pk] for pk in sorted(rows)] for name, rows in sorted(tables.items())}
    print(json.dumps(out, ensure_ascii=False, sort_keys=True))
    print(f"read {sum(counts.values())} messages: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
