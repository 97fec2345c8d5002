"""Shard and manifest writing: temporary names, checksums, sidecars, the manifest last."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.ipc as ipc

from teacher_cache import storage
from teacher_cache.format import MANIFEST, build_table, shard_name


def sidecar_name(index: int) -> str:
    return shard_name(index) + ".json"


def write_shard(
    uri: str,
    index: int,
    rows: list[dict],
    *,
    hidden_size: int,
    top_k: int,
    hidden_dtype: str,
    job_fingerprint: str,
) -> dict:
    """Write shard ``index`` (an Arrow IPC file) and its sidecar; returns the shard's manifest entry.

    The shard is serialised in memory, checksummed, written under a temporary name and moved into
    place; the sidecar (rows, tokens, sha256, job fingerprint) is written after it, so a shard counts
    as done only when both exist and agree.
    """
    fs, root, _ = storage.resolve(uri)
    rows = sorted(rows, key=lambda r: r["source_index"])
    table = build_table(rows, hidden_size, top_k, hidden_dtype)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    buf = sink.getvalue()
    digest = hashlib.sha256(memoryview(buf)).hexdigest()
    storage.atomic_write(fs, storage.join(root, shard_name(index)), buf)
    entry = {
        "index": index,
        "file": shard_name(index),
        "rows": table.num_rows,
        "tokens": int(sum(len(r["input_ids"]) for r in rows)),
        "positions": int(sum(len(r["logsumexp"]) for r in rows)),
        "truncated_prompt": int(sum(bool(r.get("truncated_prompt")) for r in rows)),
        "truncated_total": int(sum(bool(r.get("truncated_total")) for r in rows)),
        "bytes": buf.size,
        "sha256": digest,
        "first_source_index": int(rows[0]["source_index"]),
        "last_source_index": int(rows[-1]["source_index"]),
        "job_fingerprint": job_fingerprint,
    }
    storage.write_json(fs, storage.join(root, sidecar_name(index)), entry)
    return entry


def finished_shard(
    uri: str, index: int, job_fingerprint: str, expected_rows: int, verify: bool = True
) -> dict | None:
    """The sidecar entry of shard ``index`` if it is complete, from this job, and (optionally) intact."""
    fs, root, _ = storage.resolve(uri)
    side = storage.join(root, sidecar_name(index))
    path = storage.join(root, shard_name(index))
    if not (storage.exists(fs, side) and storage.exists(fs, path)):
        return None
    entry = storage.read_json(fs, side)
    if entry.get("job_fingerprint") != job_fingerprint or entry.get("rows") != expected_rows:
        return None
    if storage.size(fs, path) != entry.get("bytes"):
        return None
    if verify and storage.sha256_file(fs, path) != entry.get("sha256"):
        return None
    return entry


def write_manifest(uri: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically: the last file of a complete cache."""
    fs, root, _ = storage.resolve(uri)
    storage.write_json(fs, storage.join(root, MANIFEST), manifest)
