"""Everything the cache job writes: shards with their sidecars, the teacher's files, the manifest (last).

Every file goes to a temporary name and is moved into place when complete (``storage.atomic_write``).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from teacher_cache import storage
from teacher_cache.format import (
    EMBED_FILE,
    HEAD_FILE,
    MANIFEST,
    PROGRESS_DIR,
    TEACHER_INFO,
    TOKENIZER_DIR,
    Layout,
    build_table,
    shard_name,
)
from teacher_cache.manifest import Manifest


def sidecar_name(index: int) -> str:
    """The job's bookkeeping of shard ``index``, outside the shard folder."""
    return f"{PROGRESS_DIR}/part-{index:05d}.json"


def _legacy_sidecar_name(index: int) -> str:
    return shard_name(index) + ".json"  # where caches written before PROGRESS_DIR kept it


def serialize_shard(table: pa.Table) -> pa.Buffer:
    """A shard's bytes: the table as one Arrow IPC file, uncompressed (its size is a function of the row
    lengths and texts only, which is what lets ``pipeline.plan`` predict a cache's bytes exactly)."""
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def write_shard(uri: str, index: int, rows: list[dict], layout: Layout, *, job_fingerprint: str) -> dict:
    """Write shard ``index`` (an Arrow IPC file) and its sidecar; returns the shard's manifest entry.

    ``rows`` are dicts of column name -> value (see :func:`teacher_cache.format.build_table`) plus the
    booleans ``truncated_prompt`` and ``truncated_total``. The shard is serialised in memory, checksummed,
    written under a temporary name and moved into place; the sidecar (rows, tokens, sha256, job
    fingerprint) is written after it, so a shard counts as done only when both exist and agree.
    """
    fs, root, _ = storage.resolve(uri)
    rows = sorted(rows, key=lambda r: r["source_index"])
    table = build_table(rows, layout)
    buf = serialize_shard(table)
    digest = hashlib.sha256(memoryview(buf)).hexdigest()
    storage.atomic_write(fs, storage.join(root, shard_name(index)), buf)
    entry = {
        "index": index,
        "file": shard_name(index),
        "rows": table.num_rows,
        "tokens": int(sum(len(r["input_ids"]) for r in rows)),
        "positions": int(sum(len(r["input_ids"]) - 1 for r in rows)),
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
    if not storage.exists(fs, side):
        side = storage.join(root, _legacy_sidecar_name(index))
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


def damaged_parts(uri: str, manifest: Manifest, verify: bool = True) -> list[str]:
    """What of a finished cache no longer matches its manifest: missing, resized or (``verify``) changed files."""
    fs, root, _ = storage.resolve(uri)
    entries = [(e.file, e) for e in manifest.shards] + list(manifest.files.items())
    out = []
    for name, entry in entries:
        path = storage.join(root, name)
        if not storage.exists(fs, path):
            out.append(f"{name} missing")
        elif storage.size(fs, path) != entry.bytes:
            out.append(f"{name} has {storage.size(fs, path)} bytes, not {entry.bytes}")
        elif verify and storage.sha256_file(fs, path) != entry.sha256:
            out.append(f"{name} checksum differs")
    return out


def describe_loaded(model, teacher, uri: str, probe_ids: list[list[int]]) -> dict:
    """Check hidden x head reproduces the teacher's logits, write head and embeddings, describe the teacher.

    The description goes to ``TEACHER_INFO`` in the cache root (the driver copies it into the manifest).
    If a partial cache already holds one, the weights must be the same: a resumed job never mixes teachers.
    Idempotent: several forward actors may run it; their writes are atomic and identical.
    """
    import torch
    from safetensors.torch import save

    from teacher_cache.teacher import check_head_reproduces_logits, teacher_facts

    fs, root, _ = storage.resolve(uri)
    width = max(len(p) for p in probe_ids)
    x = torch.zeros((len(probe_ids), width), dtype=torch.long)
    m = torch.zeros_like(x)
    for i, p in enumerate(probe_ids):
        x[i, : len(p)] = torch.tensor(p)
        m[i, : len(p)] = 1
    err = check_head_reproduces_logits(model, x, m)
    facts = teacher_facts(teacher, model)
    info_path = storage.join(root, TEACHER_INFO)
    if storage.exists(fs, info_path):
        before = storage.read_json(fs, info_path)
        if before.get("weights_fingerprint") != facts["weights_fingerprint"]:
            raise ValueError(
                f"{uri}: the teacher weights changed since this partial cache was started (fingerprint "
                f"{str(before.get('weights_fingerprint'))[:12]} then, {facts['weights_fingerprint'][:12]} now); "
                "delete the directory and rerun, or restore the original teacher"
            )
    facts["head_check_max_abs_err"] = err
    head = model.get_output_embeddings()
    tensors = {"weight": head.weight.detach().contiguous().cpu()}
    if getattr(head, "bias", None) is not None:
        tensors["bias"] = head.bias.detach().contiguous().cpu()
    files = {}
    stored = [(HEAD_FILE, tensors)]
    if not facts["tied_embeddings"]:  # a tied table is the head's weight: stored once, in the head file
        stored.append(
            (EMBED_FILE, {"weight": model.get_input_embeddings().weight.detach().contiguous().cpu()})
        )
    for name, tdict in stored:
        blob = save(tdict)
        storage.atomic_write(fs, storage.join(root, name), blob)
        files[name] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    facts["files"] = files
    storage.write_json(fs, info_path, facts)
    return facts


def write_tokenizer(uri: str, tok) -> dict[str, dict]:
    """The teacher tokenizer's files under ``teacher_tokenizer/`` (small); their manifest entries."""
    fs, root, _ = storage.resolve(uri)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for p in sorted(Path(tmp).iterdir()):
            data = p.read_bytes()
            name = f"{TOKENIZER_DIR}/{p.name}"
            storage.atomic_write(fs, storage.join(root, name), data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def write_manifest(uri: str, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically: the last file of a complete cache."""
    fs, root, _ = storage.resolve(uri)
    storage.write_json(fs, storage.join(root, MANIFEST), manifest.to_dict())
