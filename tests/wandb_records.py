"""Read what an offline W&B run logged (wandb 0.31 writes only ``run-<id>.wandb``; docs/pitfalls.md #5).

The file is a 7-byte header (":W&B", 2-byte magic, version) followed by LevelDB-log-style 32 KiB blocks of
records (crc32 4 bytes, length 2 bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last), each
payload a ``wandb.proto.wandb_internal_pb2.Record``. wandb ships no reader for it, hence this test helper.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: str | Path, timeout_s: float = 60.0) -> list:
    """Every record of a finished run's file. ``run.finish()`` can return before wandb's service process has
    written the last records (seen on a loaded 2-core machine), so this waits up to ``timeout_s`` for the run's
    closing ``exit`` record."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        records = _parse(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _parse(path: str | Path) -> list:
    """The records written so far. The service process may be mid-write (seen on CI: ``finish()`` returned, the
    last record half on disk), so parsing stops at the first record that is cut short or fails its CRC
    (crc32 of the type byte + payload), and ``read_records`` reads again until the ``exit`` record is there."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        if kind == 0 and length == 0:
            pos += 7
            continue
        if len(payload) < length or zlib.crc32(bytes([kind]) + payload) != crc:
            break  # the writer has not finished this record yet
        pos += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def logged_config(path: str | Path) -> dict:
    """The run config as the W&B UI would show it (top-level key -> value)."""
    out = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def logged_history(path: str | Path) -> list[dict]:
    """Each history row (one per logged step) as a dict."""
    rows = []
    for r in read_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def logged_summary(path: str | Path) -> dict:
    """The run summary as it stands at the end (later updates of a key replace earlier ones)."""
    out = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    return out


def logged_artifacts(path: str | Path) -> list[dict]:
    """Each artefact the run logged: name, type, aliases, metadata and its manifest entries (path in the artefact ->
    ``local_path`` for a file kept for upload, ``ref`` for a reference)."""
    out = []
    for r in read_records(path):
        if r.WhichOneof("record_type") == "artifact":
            a = r.artifact
            out.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                         "metadata": json.loads(a.metadata) if a.metadata else {},
                         "files": {c.path: {"local_path": c.local_path, "ref": c.ref, "size": c.size,
                                            "digest": c.digest} for c in a.manifest.contents}})
    return out
