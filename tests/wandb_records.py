"""Read a W&B offline run file (``run-<id>.wandb``) back into ``Record`` protobuf messages.

wandb 0.31 writes these files from its Go core and ships no Python reader, so the tests decode them here.
The format is LevelDB's log format behind a 7-byte header:

    header   ":W&B" | magic 0xBEE1 (uint16 LE) | version 0 (uint8)
    blocks   32 KiB each (the header counts towards the first); a block holds physical records
    record   crc32 (uint32 LE, zlib CRC-32 of type byte + payload) | length (uint16 LE) | type (uint8) | payload
             type 1 = FULL, 2 = FIRST, 3 = MIDDLE, 4 = LAST: a logical record longer than the rest of a block
             is split into FIRST, MIDDLE..., LAST fragments. Fewer than 7 bytes left in a block are zero padding.

Each logical record is one serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")  # magic, 0xBEE1, version
RECORD = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    magic, key, version = HEADER.unpack_from(data, 0)
    if (magic, key, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B run file (header {data[:HEADER.size]!r})")
    records, fragments, pos = [], [], HEADER.size
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:  # block trailer padding
            pos += left
            continue
        crc, length, kind = RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled tail of a block still being written
            pos += left
            continue
        payload = data[pos + RECORD.size:pos + RECORD.size + length]
        if len(payload) < length:
            break  # a record cut short by a writer that was killed: everything before it is intact
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos += RECORD.size + length
        if kind == FULL:
            fragments = [payload]
        elif kind == FIRST:
            fragments = [payload]
            continue
        elif kind == MIDDLE:
            fragments.append(payload)
            continue
        elif kind == LAST:
            fragments.append(payload)
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(fragments))
        records.append(record)
    return records


def history_rows(records: list[wandb_internal_pb2.Record]) -> list[dict[str, object]]:
    """The ``wandb.log`` rows: one dict per history record, values JSON-decoded, keyed by metric name."""
    import json

    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows
