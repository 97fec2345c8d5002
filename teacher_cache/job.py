"""The teacher precompute job: a Ray Data pipeline that writes a v1 teacher cache.

    python -m teacher_cache.job --config configs/cache/<x>.yaml [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m teacher_cache.job --config ...

Stages: records (pipeline.records) -> teacher tokenisation with char offsets (actor pool) -> teacher
forward (actor pool: batch size, concurrency, GPUs per actor) -> shard writer (one actor; shards are
written under temporary names, checksummed and renamed) -> manifest (driver, last, atomic).

The job is resumable and idempotent: shards are a deterministic partition of the records; a shard whose
file and sidecar exist, agree and carry this job's fingerprint is skipped; a finished cache (manifest
with the same fingerprint) is left untouched. This is the only module of teacher_cache that imports ray.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import config_hash, describe, field, load_config
from pipeline.records import DataConfig, ReadStats, Record, read_records, records_fingerprint
from teacher_cache import storage
from teacher_cache.format import (
    BYTES_PER_VALUE,
    EMBED_FILE,
    FORMAT_NAME,
    HEAD_FILE,
    HIDDEN_DTYPES,
    JOB_STATE,
    MANIFEST,
    SCHEMA_VERSION,
    SHARD_DIR,
    TEACHER_INFO,
    TOKENIZER_DIR,
)
from teacher_cache.teacher import TeacherConfig
from teacher_cache.writer import finished_shard, write_manifest, write_shard


@dataclass
class CacheSettings:
    """What the cache stores and where."""

    output: str = field("", help="cache directory (local path or pyarrow URI such as s3://bucket/prefix)")
    max_length: int = field(512, help="max tokens of prompt+response+EOS per sample (METHOD.md §1)")
    max_prompt_length: int = field(256, help="the prompt keeps its first N teacher tokens")
    top_k: int = field(16, help="top-k next-token log-probs stored per position")
    hidden_dtype: str = field("bfloat16", help=f"storage dtype of hidden states: one of {HIDDEN_DTYPES}")
    rows_per_shard: int = field(128, help="samples per Arrow shard")
    head_chunk: int = field(
        256, help="positions per chunk when applying the LM head (bounds memory to chunk x V)"
    )
    verify_existing: bool = field(True, help="on resume, re-checksum shards that are already written")

    def validate(self) -> None:
        if not self.output:
            raise ValueError("cache.output is empty: give the directory (or URI) to write the cache to")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"cache.hidden_dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 1 <= cache.max_prompt_length < cache.max_length, got {self.max_prompt_length}, {self.max_length}"
            )
        for name in ("top_k", "rows_per_shard", "head_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"cache.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RayConfig:
    """Where and how wide the job runs."""

    address: str | None = field(
        None, help="Ray address; null = RAY_ADDRESS if set (ray job submit), else a local cluster"
    )
    batch_size: int = field(8, help="samples per teacher forward")
    concurrency: int = field(1, help="teacher actors (one teacher copy each)")
    gpus_per_actor: float = field(0.0, help="GPUs per teacher actor (0 on CPU machines)")
    cpus_per_actor: float = field(1.0, help="CPUs per teacher actor (also its torch thread count)")
    tokenizer_concurrency: int = field(1, help="tokeniser actors")
    local_num_cpus: int | None = field(
        None, help="logical CPUs of the local cluster (default: enough for the actors)"
    )
    wait_for_resources_s: float = field(
        0.0,
        help="seconds to wait for the cluster to offer the actors' GPUs/CPUs (an autoscaler adding nodes); "
        "0 = fail at once, naming what is missing, instead of waiting forever",
    )

    def validate(self) -> None:
        if self.batch_size < 1 or self.concurrency < 1 or self.tokenizer_concurrency < 1:
            raise ValueError("ray.batch_size, ray.concurrency and ray.tokenizer_concurrency must be >= 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ValueError("ray.gpus_per_actor must be >= 0 and ray.cpus_per_actor > 0")


@dataclass
class CacheJobConfig:
    """A teacher-cache job: data, teacher, cache settings, Ray resources."""

    data: DataConfig = field(default_factory=DataConfig, help="source records")
    teacher: TeacherConfig = field(default_factory=TeacherConfig, help="the teacher model")
    cache: CacheSettings = field(default_factory=CacheSettings, help="what to store and where")
    ray: RayConfig = field(default_factory=RayConfig, help="Ray resources")


# --------------------------------------------------------------------------- actors (run in Ray workers)
class Tokenize:
    """Stage 1: teacher tokenisation with character offsets (METHOD.md §1)."""

    def __init__(self, teacher: TeacherConfig, max_prompt_length: int, max_length: int):
        from pipeline.tokenize import eos_id_of
        from teacher_cache.teacher import load_tokenizer

        self.tok = load_tokenizer(teacher)
        self.eos = eos_id_of(self.tok, teacher.eos_token)
        self.kw = {"max_prompt_length": max_prompt_length, "max_length": max_length}

    def __call__(self, batch: dict) -> dict:
        from pipeline.tokenize import tokenize_pair

        ids, offs, starts, tp, tt = [], [], [], [], []
        for prompt, response in zip(batch["prompt"], batch["response"]):
            t = tokenize_pair(self.tok, str(prompt), str(response), eos_id=self.eos, **self.kw)
            ids.append(t.input_ids.tobytes())
            offs.append(t.offsets.tobytes())
            starts.append(t.response_start)
            tp.append(t.truncated_prompt)
            tt.append(t.truncated_total)
        out = dict(batch)
        out.update(
            input_ids=np.array(ids, dtype=object),
            offsets=np.array(offs, dtype=object),
            response_start=np.array(starts, dtype=np.int32),
            truncated_prompt=np.array(tp),
            truncated_total=np.array(tt),
        )
        return out


class TeacherForward:
    """Stage 2: one teacher copy per actor; hidden states and head statistics for a padded batch."""

    def __init__(
        self,
        teacher: TeacherConfig,
        top_k: int,
        hidden_dtype: str,
        head_chunk: int,
        threads: int,
        uri: str,
        probe_ids: list[list[int]],
    ):
        import torch

        from teacher_cache.teacher import load_teacher

        torch.set_num_threads(max(1, threads))
        model = load_teacher(teacher)
        # the teacher is described (probe check, head/embedding files, fingerprint) by the copy that
        # serves the forward, so the job loads it once, not twice
        describe_loaded(model, teacher, uri, probe_ids)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device)
        self.pad = 0
        self.top_k, self.hidden_dtype, self.head_chunk = top_k, hidden_dtype, head_chunk

    def __call__(self, batch: dict) -> dict:
        import torch

        from teacher_cache.format import encode_hidden
        from teacher_cache.teacher import teacher_forward

        seqs = [np.frombuffer(b, dtype=np.int32) for b in batch["input_ids"]]
        pos = [len(s) - 1 for s in seqs]
        width = max(pos)
        x = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : pos[i]] = torch.from_numpy(s[:-1].astype(np.int64))
            mask[i, : pos[i]] = 1
        out = teacher_forward(
            self.model, x.to(self.device), mask.to(self.device), self.top_k, self.head_chunk
        )
        cols: dict[str, list] = {
            k: [] for k in ("hidden", "hidden_scale", "topk_ids", "topk_logprobs", "logsumexp", "entropy")
        }
        for i, p in enumerate(pos):
            values, scale = encode_hidden(out.hidden[i, :p], self.hidden_dtype)
            cols["hidden"].append(values.tobytes())
            cols["hidden_scale"].append(b"" if scale is None else scale.tobytes())
            cols["topk_ids"].append(out.topk_ids[i, :p].to(torch.int32).cpu().numpy().tobytes())
            cols["topk_logprobs"].append(out.topk_logprobs[i, :p].float().cpu().numpy().tobytes())
            cols["logsumexp"].append(out.logsumexp[i, :p].float().cpu().numpy().tobytes())
            cols["entropy"].append(out.entropy[i, :p].float().cpu().numpy().tobytes())
        res = dict(batch)
        res.update({k: np.array(v, dtype=object) for k, v in cols.items()})
        return res


class ShardWriter:
    """Stage 3: collects rows per shard and writes each shard as soon as all its rows have arrived."""

    _STORED = {
        "hidden": None,
        "topk_ids": np.int32,
        "topk_logprobs": np.float32,
        "logsumexp": np.float32,
        "entropy": np.float32,
    }

    def __init__(
        self,
        uri: str,
        shard_rows: dict[int, int],
        top_k: int,
        hidden_dtype: str,
        job_fp: str,
    ):
        self.uri, self.expected = uri, {int(k): v for k, v in shard_rows.items()}
        # the hidden width is learnt from the first row: the teacher is only described inside its actors
        self.d, self.k, self.hdt, self.fp = None, top_k, hidden_dtype, job_fp
        self.pending: dict[int, list[dict]] = {}
        self.hidden_np = {
            "float32": np.float32,
            "bfloat16": np.uint16,
            "float16": np.float16,
            "int8": np.int8,
        }[hidden_dtype]

    def _hidden(self, blob: bytes, positions: int) -> np.ndarray:
        values = np.frombuffer(blob, dtype=self.hidden_np)
        if self.d is None:
            self.d = values.size // max(1, positions)
        if values.size != positions * self.d:
            raise ValueError(
                f"teacher hidden states of {values.size} values for {positions} positions: expected "
                f"{positions} x {self.d}; the forward actors disagree on the hidden size"
            )
        return values.reshape(positions, self.d)

    def _row(self, batch: dict, i: int) -> dict:
        ids = np.frombuffer(batch["input_ids"][i], dtype=np.int32)
        p = len(ids) - 1
        row = {
            "sample_id": str(batch["sample_id"][i]),
            "source_index": int(batch["source_index"][i]),
            "prompt": str(batch["prompt"][i]),
            "response": str(batch["response"][i]),
            "input_ids": ids,
            "offsets": np.frombuffer(batch["offsets"][i], dtype=np.int32).reshape(-1, 2),
            "response_start": int(batch["response_start"][i]),
            "truncated_prompt": bool(batch["truncated_prompt"][i]),
            "truncated_total": bool(batch["truncated_total"][i]),
            "hidden": self._hidden(batch["hidden"][i], p),
            "topk_ids": np.frombuffer(batch["topk_ids"][i], dtype=np.int32).reshape(p, self.k),
            "topk_logprobs": np.frombuffer(batch["topk_logprobs"][i], dtype=np.float32).reshape(p, self.k),
            "logsumexp": np.frombuffer(batch["logsumexp"][i], dtype=np.float32),
            "entropy": np.frombuffer(batch["entropy"][i], dtype=np.float32),
        }
        if self.hdt == "int8":
            row["hidden_scale"] = np.frombuffer(batch["hidden_scale"][i], dtype=np.float32)
        return row

    def __call__(self, batch: dict) -> dict:
        done = []
        for i in range(len(batch["sample_id"])):
            shard = int(batch["shard"][i])
            self.pending.setdefault(shard, []).append(self._row(batch, i))
            if len(self.pending[shard]) == self.expected[shard]:
                entry = write_shard(
                    self.uri,
                    shard,
                    self.pending.pop(shard),
                    hidden_size=self.d,
                    top_k=self.k,
                    hidden_dtype=self.hdt,
                    job_fingerprint=self.fp,
                )
                done.append(json.dumps(entry))
        return {"entry": np.array(done, dtype=object)}


# --------------------------------------------------------------------------- driver
def describe_loaded(model, teacher: TeacherConfig, uri: str, probe_ids: list[list[int]]) -> dict:
    """Check hidden x head reproduces the teacher's logits, write head and embeddings, describe the teacher.

    The description goes to ``TEACHER_INFO`` in the cache root (the driver copies it into the manifest).
    If a partial cache already holds one, the weights must be the same: a resumed job never mixes teachers.
    Idempotent: several forward actors may run it; their writes are atomic and identical.
    """
    import hashlib

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
    for name, tdict in (
        (HEAD_FILE, tensors),
        (EMBED_FILE, {"weight": model.get_input_embeddings().weight.detach().contiguous().cpu()}),
    ):
        blob = save(tdict)
        storage.atomic_write(fs, storage.join(root, name), blob)
        files[name] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    facts["files"] = files
    storage.write_json(fs, info_path, facts)
    return facts


def _describe_teacher(teacher: TeacherConfig, uri: str, probe_ids: list[list[int]]) -> dict:
    """Load the teacher and describe it (used when no forward actor runs: every shard already exists)."""
    from teacher_cache.teacher import load_teacher

    return describe_loaded(load_teacher(teacher), teacher, uri, probe_ids)


def damaged_parts(uri: str, manifest: dict, verify: bool = True) -> list[str]:
    """What of a finished cache no longer matches its manifest: missing, resized or (``verify``) changed files."""
    fs, root, _ = storage.resolve(uri)
    entries = [(e["file"], e) for e in manifest.get("shards", [])] + list(manifest.get("files", {}).items())
    out = []
    for name, entry in entries:
        path = storage.join(root, name)
        if not storage.exists(fs, path):
            out.append(f"{name} missing")
        elif storage.size(fs, path) != entry.get("bytes"):
            out.append(f"{name} has {storage.size(fs, path)} bytes, not {entry.get('bytes')}")
        elif verify and storage.sha256_file(fs, path) != entry.get("sha256"):
            out.append(f"{name} checksum differs")
    return out


def _shard_plan(n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_shard, n)) for s in range(0, n, rows_per_shard)]


def job_fingerprint(cfg: CacheJobConfig, records_fp: str, tokenizer_sha: str) -> str:
    """Identity of a cache's content: data, teacher config, tokenizer, storage settings (not Ray resources)."""
    settings = {
        k: v for k, v in vars(cfg.cache).items() if k not in ("output", "verify_existing", "head_chunk")
    }
    teacher = {k: v for k, v in vars(cfg.teacher).items()}
    return config_hash(
        {
            "records": records_fp,
            "tokenizer": tokenizer_sha,
            "teacher": teacher,
            "settings": settings,
            "schema": SCHEMA_VERSION,
        }
    )


def _init_ray(cfg: RayConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        need = cfg.concurrency * cfg.cpus_per_actor + 1
        ncpu = cfg.local_num_cpus or max(os.cpu_count() or 1, math.ceil(need))
        ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=True)
    return ray


def actors_that_fit(nodes: list[dict], gpus: float, cpus: float) -> int:
    """How many actors needing ``gpus`` GPUs and ``cpus`` CPUs the alive nodes can host at once."""
    total = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        res = node.get("Resources", {})
        fit_cpu = math.floor(res.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else 10**9
        fit_gpu = math.floor(res.get("GPU", 0.0) / gpus + 1e-9) if gpus > 0 else 10**9
        total += min(fit_cpu, fit_gpu)
    return total


def check_resources(ray, cfg: RayConfig) -> None:
    """Fail in seconds (or after ``wait_for_resources_s``) when the teacher actors cannot be placed.

    Ray would otherwise queue them forever ("may hang forever" is only a warning).
    """
    deadline = time.time() + cfg.wait_for_resources_s
    while True:
        fit = actors_that_fit(ray.nodes(), cfg.gpus_per_actor, cfg.cpus_per_actor)
        if fit >= cfg.concurrency:
            return
        if time.time() >= deadline:
            have = ray.cluster_resources()
            raise RuntimeError(
                f"the Ray cluster can host {fit} of the {cfg.concurrency} teacher actor(s) asked for "
                f"(each needs {cfg.gpus_per_actor:g} GPU and {cfg.cpus_per_actor:g} CPU on one node; the cluster "
                f"has {have.get('GPU', 0):g} GPU and {have.get('CPU', 0):g} CPU in all): lower ray.concurrency, "
                "ray.gpus_per_actor or ray.cpus_per_actor, add nodes, or set ray.wait_for_resources_s for an "
                "autoscaler"
            )
        time.sleep(min(5.0, max(0.1, deadline - time.time())))


def run(cfg: CacheJobConfig, *, progress: bool = True) -> dict:
    """Build (or complete) the cache described by ``cfg``; returns the manifest."""
    from pipeline.tokenize import eos_id_of
    from teacher_cache.teacher import load_tokenizer, tokenizer_fingerprint

    t0 = time.time()
    uri = cfg.cache.output
    fs, root, _ = storage.resolve(uri)
    stats = ReadStats()
    records: list[Record] = list(read_records(cfg.data, stats))
    if not records:
        raise ValueError(
            f"{cfg.data.path}: no usable records (read {stats.read}, empty {stats.skipped_empty})"
        )
    rec_fp = records_fingerprint(records)
    tok = load_tokenizer(cfg.teacher)
    eos = eos_id_of(tok, cfg.teacher.eos_token)
    tok_facts = tokenizer_fingerprint(tok, eos)
    fp = job_fingerprint(cfg, rec_fp, tok_facts["sha256"])

    mpath = storage.join(root, MANIFEST)
    if storage.exists(fs, mpath):
        manifest = storage.read_json(fs, mpath)
        if manifest.get("job_fingerprint") == fp:
            damaged = damaged_parts(uri, manifest, verify=cfg.cache.verify_existing)
            if not damaged:
                print(
                    f"[teacher_cache] {uri} is complete for this config ({manifest['stats']['rows']} rows, every "
                    f"file {'verified' if cfg.cache.verify_existing else 'present with its size'}); nothing to do"
                )
                return manifest
            # the same path as a resume: intact shards are kept, the damaged ones rebuilt, the manifest rewritten
            print(
                f"[teacher_cache] {uri} is finished but damaged ({'; '.join(damaged)}): rebuilding those parts"
            )
        else:
            raise ValueError(
                f"{uri} already holds a finished cache built from a different config (fingerprint "
                f"{manifest.get('job_fingerprint', '?')[:12]} vs {fp[:12]}); choose another cache.output or delete it"
            )
    spath = storage.join(root, JOB_STATE)
    if storage.exists(fs, spath):
        state = storage.read_json(fs, spath)
        if state.get("job_fingerprint") != fp:
            raise ValueError(
                f"{uri} holds a partial cache of a different job (fingerprint {state.get('job_fingerprint', '?')[:12]} "
                f"vs {fp[:12]}); choose another cache.output or delete the directory"
            )
    else:
        storage.write_json(
            fs, spath, {"job_fingerprint": fp, "started": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        )
    removed = storage.remove_temporaries(fs, storage.join(root, SHARD_DIR)) + storage.remove_temporaries(
        fs, root
    )
    if removed:
        print(f"[teacher_cache] removed {removed} temporary file(s) left by an interrupted run")

    plan = _shard_plan(len(records), cfg.cache.rows_per_shard)
    done: dict[int, dict] = {}
    for idx, (a, b) in enumerate(plan):
        entry = finished_shard(uri, idx, fp, b - a, verify=cfg.cache.verify_existing)
        if entry is not None:
            done[idx] = entry
    pending = [i for i in range(len(plan)) if i not in done]
    print(
        f"[teacher_cache] {len(records)} records kept of {stats.read} read ({stats.skipped_empty} empty, "
        f"{stats.duplicates} duplicates skipped) -> {len(plan)} shards ({len(done)} already written, "
        f"{len(pending)} to do) in {uri}"
    )

    ray = _init_ray(cfg.ray)
    check_resources(ray, cfg.ray)
    from teacher_cache.teacher import TeacherConfig as _TC  # noqa: F401  (pickled by reference in actors)

    probe = [
        tok(records[i].prompt + records[i].response, add_special_tokens=False)["input_ids"][:64]
        for i in range(min(2, len(records)))
    ]
    if pending:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = progress
        items = []
        for idx in pending:
            a, b = plan[idx]
            for i in range(a, b):
                r = records[i]
                items.append(
                    {
                        "shard": idx,
                        "source_index": i,
                        "sample_id": r.sample_id,
                        "prompt": r.prompt,
                        "response": r.response,
                    }
                )
        shard_rows = {idx: plan[idx][1] - plan[idx][0] for idx in pending}
        ds = ray.data.from_items(items)
        ds = ds.map_batches(
            Tokenize,
            fn_constructor_kwargs={
                "teacher": cfg.teacher,
                "max_prompt_length": cfg.cache.max_prompt_length,
                "max_length": cfg.cache.max_length,
            },
            batch_size=64,
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.tokenizer_concurrency),
            num_cpus=0.25,
        )
        ds = ds.map_batches(
            TeacherForward,
            fn_constructor_kwargs={
                "teacher": cfg.teacher,
                "top_k": cfg.cache.top_k,
                "hidden_dtype": cfg.cache.hidden_dtype,
                "head_chunk": cfg.cache.head_chunk,
                "threads": int(max(1, cfg.ray.cpus_per_actor)),
                "uri": uri,
                "probe_ids": probe,
            },
            batch_size=cfg.ray.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.concurrency),
            num_gpus=cfg.ray.gpus_per_actor,
            num_cpus=cfg.ray.cpus_per_actor,
        )
        ds = ds.map_batches(
            ShardWriter,
            fn_constructor_kwargs={
                "uri": uri,
                "shard_rows": shard_rows,
                "top_k": cfg.cache.top_k,
                "hidden_dtype": cfg.cache.hidden_dtype,
                "job_fp": fp,
            },
            batch_size=cfg.ray.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.25,
        )
        for row in ds.iter_rows():
            entry = json.loads(row["entry"])
            done[entry["index"]] = entry
            print(
                f"[teacher_cache] shard {entry['index'] + 1}/{len(plan)} written ({entry['rows']} rows, {entry['bytes'] / 1e6:.1f} MB)",
                flush=True,
            )

    else:
        # every shard exists (a run died before its manifest): describe the teacher in a task of its own,
        # which also refuses weights that differ from the ones the shards were written with
        describe_remote = ray.remote(num_gpus=cfg.ray.gpus_per_actor, num_cpus=cfg.ray.cpus_per_actor)(
            _describe_teacher
        )
        ray.get(describe_remote.remote(cfg.teacher, uri, probe))
    teacher_info = storage.read_json(fs, storage.join(root, TEACHER_INFO))

    missing = [i for i in range(len(plan)) if i not in done]
    if missing:
        raise RuntimeError(f"{uri}: shards {missing} were not written; re-run the job to complete the cache")
    shards = [done[i] for i in range(len(plan))]
    manifest = _manifest(cfg, fp, records, stats, rec_fp, tok_facts, teacher_info, shards, time.time() - t0)
    manifest["files"].update(_write_tokenizer(fs, root, tok))
    write_manifest(uri, manifest)
    s = manifest["stats"]
    print(
        f"[teacher_cache] done: {s['rows']} rows ({s['truncated_prompt']} prompts and {s['truncated_total']} "
        f"sequences cut to the token limits), {s['positions']} positions, {s['bytes'] / 1e6:.1f} MB of shards, "
        f"{s['bytes_per_position']:.0f} B/position ({cfg.cache.hidden_dtype} hidden) -> {uri}"
    )
    return manifest


def _write_tokenizer(fs, root: str, tok) -> dict[str, dict]:
    """The teacher tokenizer's files under ``teacher_tokenizer/`` (small); their manifest entries."""
    import hashlib
    import tempfile

    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for p in sorted(Path(tmp).iterdir()):
            data = p.read_bytes()
            name = f"{TOKENIZER_DIR}/{p.name}"
            storage.atomic_write(fs, storage.join(root, name), data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _manifest(cfg, fp, records, stats, rec_fp, tok_facts, teacher_info, shards, seconds) -> dict:
    total_bytes = sum(e["bytes"] for e in shards)
    positions = sum(e["positions"] for e in shards)
    d = teacher_info["hidden_size"]
    files = teacher_info.pop("files")
    teacher_info.pop("head_check_max_abs_err", None)
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "job_fingerprint": fp,
        "teacher": teacher_info,
        "tokenizer": tok_facts,
        "source": {
            "path": cfg.data.path,
            "format": cfg.data.format,
            "split": cfg.data.split,
            "prompt_template": "as in the source (dskd) / Alpaca-MiniLLM (dolly); see pipeline.records",
            "records_fingerprint": rec_fp,
            "read": stats.read,
            "kept": stats.kept,
            "skipped_empty": stats.skipped_empty,
            "duplicates": stats.duplicates,
        },
        "settings": {
            "max_length": cfg.cache.max_length,
            "max_prompt_length": cfg.cache.max_prompt_length,
            "top_k": cfg.cache.top_k,
            "hidden_dtype": cfg.cache.hidden_dtype,
            "layers": ["final"],
            "rows_per_shard": cfg.cache.rows_per_shard,
            "positions": "P = L - 1 per row; position t predicts input_ids[t + 1]",
        },
        "stats": {
            "rows": len(records),
            "tokens": sum(e["tokens"] for e in shards),
            "positions": positions,
            "truncated_prompt": sum(e["truncated_prompt"] for e in shards),
            "truncated_total": sum(e["truncated_total"] for e in shards),
            "bytes": total_bytes,
            "bytes_per_position": total_bytes / max(1, positions),
            "hidden_bytes_per_position": d * BYTES_PER_VALUE[cfg.cache.hidden_dtype]
            + (4 if cfg.cache.hidden_dtype == "int8" else 0),
            "dense_fp16_logits_bytes_per_position": 2 * teacher_info["head_rows"],
            "job_seconds": round(seconds, 2),
        },
        "shards": [
            {k: e[k] for k in ("file", "rows", "tokens", "positions", "bytes", "sha256")} for e in shards
        ],
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m teacher_cache.job",
        description="Run the teacher once over the data and write a reusable teacher cache (Arrow shards).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value):\n" + "\n".join(describe(CacheJobConfig)),
    )
    parser.add_argument("--config", help="YAML config (configs/cache/*.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. ray.batch_size=4 cache.hidden_dtype=int8"
    )
    args = parser.parse_args(argv)
    cfg = load_config(CacheJobConfig, args.config, args.overrides)
    run(cfg, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
