"""An independent reader for tests/tests/formats.rs: turns Kafka records (JSON lines on stdin: headers
as [name, hex value] pairs, key and value in hex) into CloudEvents with the CloudEvents SDK's Kafka
binding (binary content mode), and prints each event's attributes and data as a JSON line. Fails
on a record the SDK does not accept, or whose time is not RFC 3339."""
import datetime
import json
import sys

from cloudevents.v1.kafka import KafkaMessage, from_binary

for line in sys.stdin:
    record = json.loads(line)
    headers = {name: bytes.fromhex(value) for name, value in record["headers"]}
    key = bytes.fromhex(record["key"]) if record["key"] is not None else None
    event = from_binary(
        KafkaMessage(headers=headers, key=key, value=bytes.fromhex(record["value"])),
        data_unmarshaller=lambda data: data,
    )
    attributes = dict(event.get_attributes())
    time = datetime.datetime.fromisoformat(attributes["time"].replace("Z", "+00:00"))
    if time.tzinfo is None or time.utcoffset() != datetime.timedelta(0):
        raise SystemExit(f"time {attributes['time']!r} is not UTC")
    attributes["time_unix"] = time.timestamp()
    if isinstance(attributes.get("partitionkey"), bytes):
        attributes["partitionkey"] = attributes["partitionkey"].decode()
    attributes["data_hex"] = event.get_data().hex()
    print(json.dumps(attributes, default=str))
