"""The teacher precompute job: a Ray Data pipeline that writes a v1 teacher cache.

    python -m teacher_cache.job --config configs/cache/<x>.yaml [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m teacher_cache.job --config ...

Stages: records (pipeline.records, streamed twice by the driver: once for the fingerprint, once into one
staging parquet file per pending shard; it never holds more than one shard of records) -> Ray Data
read_parquet of the staging files -> teacher tokenisation with char offsets (actor pool) -> teacher forward
(actor pool: batch size, concurrency, GPUs per actor) -> shard writers (a pool; shard k always goes to writer
k mod N; shards are written under temporary names, checksummed and renamed) -> manifest (driver, last, atomic).

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

import numpy as np

from pipeline.config import (
    PRINT_CONFIG_HELP,
    config_hash,
    describe,
    field,
    load_config,
    print_config,
    to_dict,
)
from pipeline.records import DataConfig, ReadStats, read_records, records_fingerprint
from teacher_cache import storage
from teacher_cache.format import (
    HIDDEN_DTYPES,
    JOB_STATE,
    MANIFEST,
    PROGRESS_DIR,
    SHARD_DIR,
    STAGING_DIR,
    TEACHER_INFO,
    schema_version,
)
from teacher_cache.manifest import CacheError, Manifest, Settings, build_manifest, parse_manifest
from teacher_cache.teacher import TeacherConfig
from teacher_cache.writer import (
    damaged_parts,
    describe_loaded,
    finished_shard,
    write_manifest,
    write_tokenizer,
)


@dataclass
class CacheSettings:
    """What the cache stores and where."""

    output: str = field("", help="cache directory (local path or pyarrow URI such as s3://bucket/prefix)")
    max_length: int = field(512, help="max tokens of prompt+response+EOS per sample (METHOD.md §1)")
    max_prompt_length: int = field(256, help="the prompt keeps its first N teacher tokens")
    top_k: int = field(16, help="top-k next-token log-probs stored per position")
    hidden_dtype: str = field(
        "float16",
        help=f"storage dtype of hidden states: one of {HIDDEN_DTYPES}; float16 (default) is as small as bfloat16 "
        "with ~50x lower KL (docs/BENCHMARKS.md) and refuses values beyond its range; bfloat16 for teachers with "
        "outliers above 65504",
    )
    rows_per_shard: int = field(128, help="samples per Arrow shard")
    layers: list[int] = field(
        default_factory=lambda: [-1],
        help="teacher layers to store: -1 the final normed state (always stored), n >= 0 HF hidden_states[n] "
        "(0 = embeddings output, n = after block n), e.g. [8,16,-1]; intermediate layers make a v2 cache",
    )
    salience: bool = field(
        False,
        help="SRA: also store, for the final state and every layer n >= 1, the attention the last real position "
        "pays to each position in the block that produced it (mean over heads; the teacher runs with eager "
        "attention); makes a v2 cache",
    )
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
        if -1 not in self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < -1:
            raise ValueError(
                f"cache.layers must list distinct layers, -1 (the final state) among them and the others >= 0; "
                f"got {self.layers}"
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
    writer_concurrency: int = field(
        1, help="shard-writer actors; shard k always goes to writer k mod N (each holds only its open shards)"
    )
    local_num_cpus: int | None = field(
        None, help="logical CPUs of the local cluster (default: enough for the actors)"
    )
    task_timeout_s: float = field(
        3600.0, help="seconds a single Ray task of the driver (the teacher description on resume) may take"
    )
    wait_for_resources_s: float = field(
        0.0,
        help="seconds to wait for the cluster to offer the actors' GPUs/CPUs (an autoscaler adding nodes); "
        "0 = fail at once, naming what is missing, instead of waiting forever",
    )

    def validate(self) -> None:
        if min(self.batch_size, self.concurrency, self.tokenizer_concurrency, self.writer_concurrency) < 1:
            raise ValueError(
                "ray.batch_size, ray.concurrency, ray.tokenizer_concurrency and ray.writer_concurrency must be >= 1"
            )
        if self.task_timeout_s <= 0:
            raise ValueError(f"ray.task_timeout_s must be > 0, got {self.task_timeout_s}")
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
            ids.append(t.input_ids)
            offs.append(t.offsets)
            starts.append(t.response_start)
            tp.append(t.truncated_prompt)
            tt.append(t.truncated_total)
        out = dict(batch)
        out.update(
            input_ids=_ragged(ids),
            offsets=_ragged(offs),
            response_start=np.array(starts, dtype=np.int32),
            truncated_prompt=np.array(tp),
            truncated_total=np.array(tt),
        )
        return out


class TeacherForward:
    """Stage 2: one teacher copy per actor; every per-position column of the layout for a padded batch."""

    def __init__(
        self,
        teacher: TeacherConfig,
        top_k: int,
        hidden_dtype: str,
        layers: tuple[int, ...],
        head_chunk: int,
        threads: int,
        uri: str,
        probe_ids: list[list[int]],
        writers: list,
        write_timeout_s: float,
        salience: bool = False,
    ):
        import torch

        from teacher_cache.format import Layout
        from teacher_cache.teacher import check_layers, load_teacher
        from teacher_cache.writer import describe_loaded

        torch.set_num_threads(max(1, threads))
        model = load_teacher(teacher)
        # the teacher is described (probe check, head/embedding files, fingerprint) by the copy that
        # serves the forward, so the job loads it once, not twice
        facts = describe_loaded(model, teacher, uri, probe_ids)
        check_layers(tuple(layers), int(model.config.num_hidden_layers))
        self.layout = Layout(facts["hidden_size"], top_k, hidden_dtype, tuple(layers), salience)
        if salience:  # attention probabilities are returned by the eager implementation only
            model.set_attn_implementation("eager")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device)
        self.head_chunk = head_chunk
        self.writers, self.write_timeout_s = writers, write_timeout_s

    def __call__(self, batch: dict) -> dict:
        import torch

        from teacher_cache.format import (
            columns,
            encode_positions,
            layer_column,
            salience_column,
            salience_layers,
        )
        from teacher_cache.teacher import teacher_forward

        seqs = list(batch["input_ids"])
        pos = [len(s) - 1 for s in seqs]
        x = torch.zeros((len(seqs), max(pos)), dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, s in enumerate(seqs):
            x[i, : pos[i]] = torch.from_numpy(np.asarray(s[:-1], dtype=np.int64))
            mask[i, : pos[i]] = 1
        out = teacher_forward(
            self.model,
            x.to(self.device),
            mask.to(self.device),
            self.layout.top_k,
            self.head_chunk,
            self.layout.layers,
            salience_layers(self.layout),
        )
        cols: dict[str, list] = {}
        computed = {**vars(out), **{layer_column(n): h for n, h in out.layers.items()}}
        computed.update({salience_column(n): a for n, a in out.salience.items()})
        for c in columns(self.layout):
            if c.per == "position" and c.name in computed:
                for i, p in enumerate(pos):
                    for name, arr in encode_positions(c.name, computed[c.name][i, :p], self.layout).items():
                        cols.setdefault(name, []).append(arr)
        res = dict(batch)
        res.update({k: _ragged(v) for k, v in cols.items()})
        return {"entry": self._send(res)}

    def _send(self, batch: dict) -> np.ndarray:
        """Hand each shard's rows to its writer (shard k -> writer k mod N); the entries of shards completed."""
        import ray

        shards = np.asarray(batch["shard"])
        refs = []
        for shard in np.unique(shards):
            sel = np.nonzero(shards == shard)[0]
            part = {k: np.asarray(v)[sel] for k, v in batch.items()}
            refs.append(self.writers[int(shard) % len(self.writers)].add.remote(part))
        try:  # waiting is the back-pressure that bounds the rows a writer holds
            entries = [e for found in ray.get(refs, timeout=self.write_timeout_s) for e in found]
        except ray.exceptions.GetTimeoutError as e:
            raise RuntimeError(
                f"a shard writer did not take its rows within ray.task_timeout_s={self.write_timeout_s:g} s "
                "(a stuck or very slow cache.output filesystem?)"
            ) from e
        return np.array(entries, dtype=object)


def _ragged(arrays: list) -> np.ndarray:
    """A column of per-row arrays of different lengths as Ray Data carries it (an object array)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _owned(value):
    """A numpy scalar as its Python value, an array as a copy of its own."""
    if isinstance(value, np.generic):
        return value.item()
    return np.array(value, copy=True) if isinstance(value, np.ndarray) else value


class ShardWriter:
    """Stage 3 (a Ray actor; a pool of them): collects the rows of its shards and writes each shard, rows in
    source order, as soon as all of them have arrived.

    Ray Data retries a forward batch whose actor died, so a row may arrive twice: rows are keyed by their
    source index (a repeat replaces, never adds), rows of a shard already written are ignored, and a shard is
    written only when it holds exactly the source indexes of its range."""

    def __init__(
        self,
        uri: str,
        shard_ranges: dict[int, tuple[int, int]],
        top_k: int,
        hidden_dtype: str,
        layers: tuple[int, ...],
        job_fp: str,
        salience: bool = False,
    ):
        self.uri, self.ranges = uri, {int(k): (int(a), int(b)) for k, (a, b) in shard_ranges.items()}
        self.salience = salience
        # the hidden width is learnt from the first row: the teacher is only described inside its actors
        self.top_k, self.hidden_dtype, self.layers, self.fp = top_k, hidden_dtype, tuple(layers), job_fp
        self.layout = None
        self.pending: dict[int, dict[int, dict]] = {}
        self.written: dict[int, str] = {}  # shard -> its entry (json)

    def open_shards(self) -> dict[int, int]:
        """Rows held per shard not yet complete (empty after a clean run)."""
        return {k: len(v) for k, v in self.pending.items()}

    def completed(self) -> list[str]:
        """The entries of every shard this writer wrote (the driver's record, whatever Ray Data delivered)."""
        return list(self.written.values())

    def add(self, batch: dict) -> list[str]:
        from teacher_cache.format import Layout, columns
        from teacher_cache.writer import write_shard

        done = []
        for i in range(len(batch["sample_id"])):
            shard, index = int(batch["shard"][i]), int(batch["source_index"][i])
            if shard not in self.ranges:
                raise RuntimeError(f"shard writer got a row of shard {shard}, which is not one of its shards")
            a, b = self.ranges[shard]
            if not a <= index < b:
                raise RuntimeError(f"row {index} is outside shard {shard}'s rows [{a}, {b})")
            if shard in self.written:  # a retried batch repeats rows of a shard already written
                continue
            if self.layout is None:  # the hidden width, learnt from the first row
                self.layout = Layout(
                    int(batch["hidden"][i].shape[1]),
                    self.top_k,
                    self.hidden_dtype,
                    self.layers,
                    self.salience,
                )
            # copies: views would pin the whole batch in Ray's object store until the shard is written
            row = {c.name: _owned(batch[c.name][i]) for c in columns(self.layout)}
            row.update(
                truncated_prompt=bool(batch["truncated_prompt"][i]),
                truncated_total=bool(batch["truncated_total"][i]),
            )
            rows = self.pending.setdefault(shard, {})
            rows[index] = row
            if len(rows) == b - a:  # keys are distinct indexes in [a, b): exactly the shard's rows
                entry = write_shard(
                    self.uri, shard, [rows[k] for k in range(a, b)], self.layout, job_fingerprint=self.fp
                )
                del self.pending[shard]
                self.written[shard] = json.dumps(entry)
                done.append(self.written[shard])
        return done


# --------------------------------------------------------------------------- driver
def _describe_teacher(teacher: TeacherConfig, uri: str, probe_ids: list[list[int]]) -> dict:
    """Load the teacher and describe it (used when no forward actor runs: every shard already exists)."""
    from teacher_cache.teacher import load_teacher

    return describe_loaded(load_teacher(teacher), teacher, uri, probe_ids)


LIGHT_CPUS = 0.25  # what the tokeniser actors, the shard writers and the staging read tasks each ask of Ray


def light_cpus(cfg: RayConfig) -> float:
    """The CPUs the light stages need beside the teacher actors: tokenisers, writers and a read task."""
    return LIGHT_CPUS * (cfg.tokenizer_concurrency + cfg.writer_concurrency + 1)


def _shard_plan(n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_shard, n)) for s in range(0, n, rows_per_shard)]


def staging_name(index: int) -> str:
    return f"{STAGING_DIR}/part-{index:05d}.parquet"


def scan_records(data: DataConfig, stats: ReadStats) -> tuple[int, str, list[str]]:
    """One streamed pass over the source: (records kept, their fingerprint, the first two texts)."""
    n, probe = 0, []

    def counted():
        nonlocal n
        for r in read_records(data, stats):
            if n < 2:
                probe.append(r.prompt + r.response)
            n += 1
            yield r

    fp = records_fingerprint(counted())  # runs the pass: n and probe are filled in by then
    return n, fp, probe


def stage_inputs(
    data: DataConfig, uri: str, n: int, fingerprint: str, rows_per_shard: int, pending: set[int]
) -> list[str]:
    """A second streamed pass: the rows of each pending shard into its staging parquet file (written
    atomically); the driver holds one shard of records at a time. The pass must meet the records the first
    one fingerprinted (the source may change in between). Returns the files' paths in shard order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root, _ = storage.resolve(uri)
    paths: list[str] = []
    rows: list[dict] = []
    seen = 0

    def flush(shard: int) -> None:
        if shard in pending:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(rows), sink)
            path = storage.join(root, staging_name(shard))
            storage.atomic_write(fs, path, sink.getvalue())
            paths.append(path)
        rows.clear()

    def staged():
        nonlocal seen
        for i, r in enumerate(read_records(data)):
            seen = i + 1
            if seen > n:
                return
            shard = i // rows_per_shard
            if shard in pending:
                rows.append(
                    {
                        "shard": shard,
                        "source_index": i,
                        "sample_id": r.sample_id,
                        "prompt": r.prompt,
                        "response": r.response,
                    }
                )
            if seen % rows_per_shard == 0 or seen == n:
                flush(shard)
            yield r

    if records_fingerprint(staged()) != fingerprint or seen != n:
        raise RuntimeError(
            f"{data.path} changed while the job read it: its second pass met other records than the {n} of the "
            "first; re-run the job once the source is complete"
        )
    return paths


def job_fingerprint(cfg: CacheJobConfig, records_fp: str, tokenizer_sha: str) -> str:
    """Identity of a cache's content: data, teacher config, tokenizer, storage settings (not Ray resources)."""
    settings = {
        k: v for k, v in vars(cfg.cache).items() if k not in ("output", "verify_existing", "head_chunk")
    }
    extra = intermediate_layers(cfg.cache)
    if not extra:  # a final-state-only cache is the v1 cache it always was: same identity
        settings.pop("layers")
    if not cfg.cache.salience:  # caches made before the option keep their identity
        settings.pop("salience")
    teacher = {k: v for k, v in vars(cfg.teacher).items()}
    return config_hash(
        {
            "records": records_fp,
            "tokenizer": tokenizer_sha,
            "teacher": teacher,
            "settings": settings,
            "schema": schema_version(extra, cfg.cache.salience),
        }
    )


def intermediate_layers(cache: CacheSettings) -> tuple[int, ...]:
    """The layers stored besides the final state, ascending."""
    return tuple(sorted(n for n in cache.layers if n != -1))


def _init_ray(cfg: RayConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        need = cfg.concurrency * cfg.cpus_per_actor + light_cpus(cfg)
        ncpu = cfg.local_num_cpus or max(os.cpu_count() or 1, math.ceil(need))
        # a local cluster shares its machine with the teacher's threads: tolerate a raylet that answers late
        # (the default gives up after ~5 missed checks and kills a cache build on a loaded host)
        ray.init(
            num_cpus=ncpu,
            include_dashboard=False,
            log_to_driver=True,
            _system_config={"health_check_failure_threshold": 60, "health_check_timeout_ms": 30000},
        )
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
    light = light_cpus(cfg)
    while True:
        nodes = ray.nodes()
        fit = actors_that_fit(nodes, cfg.gpus_per_actor, cfg.cpus_per_actor)
        cpus = sum(n.get("Resources", {}).get("CPU", 0.0) for n in nodes if n.get("Alive", True))
        spare = cpus - cfg.concurrency * cfg.cpus_per_actor
        if fit >= cfg.concurrency and spare >= light - 1e-9:
            return
        if fit >= cfg.concurrency and time.time() >= deadline:
            raise RuntimeError(
                f"the Ray cluster has {cpus:g} CPU: the {cfg.concurrency} teacher actor(s) take "
                f"{cfg.concurrency * cfg.cpus_per_actor:g} and the tokeniser(s), shard writer(s) and read tasks need "
                f"{light:g} more ({LIGHT_CPUS:g} each); lower ray.cpus_per_actor, ray.tokenizer_concurrency or "
                "ray.writer_concurrency, or add a node"
            )
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


def run(cfg: CacheJobConfig, *, progress: bool = True) -> Manifest:
    """Build (or complete) the cache described by ``cfg``; returns the manifest."""
    from pipeline.tokenize import eos_id_of
    from teacher_cache.teacher import check_layers, load_tokenizer, teacher_depth, tokenizer_fingerprint

    t0 = time.time()
    uri = cfg.cache.output
    fs, root, _ = storage.resolve(uri)
    stats = ReadStats()
    n_records, rec_fp, probe_texts = scan_records(cfg.data, stats)
    if not n_records:
        raise ValueError(
            f"{cfg.data.path}: no usable records (read {stats.read}, empty {stats.skipped_empty})"
        )
    if intermediate_layers(cfg.cache):  # before any actor starts: the config says how deep the teacher is
        check_layers(intermediate_layers(cfg.cache), teacher_depth(cfg.teacher))
    tok = load_tokenizer(cfg.teacher)
    eos = eos_id_of(tok, cfg.teacher.eos_token)
    tok_facts = tokenizer_fingerprint(tok, eos)
    fp = job_fingerprint(cfg, rec_fp, tok_facts["sha256"])

    mpath = storage.join(root, MANIFEST)
    if storage.exists(fs, mpath):
        try:
            raw = storage.read_json(fs, mpath)
        except ValueError:
            raw = {}
        found = raw.get("job_fingerprint") if isinstance(raw, dict) else None
        if found is not None and found != fp:
            raise ValueError(
                f"{uri} already holds a finished cache built from a different config (fingerprint "
                f"{str(found)[:12]} vs {fp[:12]}); choose another cache.output or delete it"
            )
        try:
            manifest = parse_manifest(raw, uri)
            damaged = damaged_parts(uri, manifest, verify=cfg.cache.verify_existing)
        except CacheError as e:
            damaged = [f"its manifest is unreadable: {e}"]
        if not damaged:
            print(
                f"[teacher_cache] {uri} is complete for this config ({manifest.stats.rows} rows, every "
                f"file {'verified' if cfg.cache.verify_existing else 'present with its size'}); nothing to do"
            )
            return manifest
        # the same path as a resume: intact shards are kept, the damaged ones rebuilt, the manifest rewritten
        print(f"[teacher_cache] {uri} is finished but damaged ({'; '.join(damaged)}): rebuilding those parts")
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
    removed = sum(
        storage.remove_temporaries(fs, storage.join(root, d)) for d in (SHARD_DIR, PROGRESS_DIR, STAGING_DIR)
    ) + storage.remove_temporaries(fs, root)
    if removed:
        print(f"[teacher_cache] removed {removed} temporary file(s) left by an interrupted run")

    plan = _shard_plan(n_records, cfg.cache.rows_per_shard)
    done: dict[int, dict] = {}
    for idx, (a, b) in enumerate(plan):
        entry = finished_shard(uri, idx, fp, b - a, verify=cfg.cache.verify_existing)
        if entry is not None:
            done[idx] = entry
    pending = [i for i in range(len(plan)) if i not in done]
    print(
        f"[teacher_cache] {n_records} records kept of {stats.read} read ({stats.skipped_empty} empty, "
        f"{stats.duplicates} duplicates skipped) -> {len(plan)} shards ({len(done)} already written, "
        f"{len(pending)} to do) in {uri}"
    )

    ray = _init_ray(cfg.ray)
    check_resources(ray, cfg.ray)
    probe = [tok(t, add_special_tokens=False)["input_ids"][:64] for t in probe_texts]
    if pending:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = progress
        # Ray >= 2.5x: its V2 reader lists files in a task that asks for a whole CPU, which a cluster sized for
        # the teacher actors may never free (the read would wait forever); the V1 reader's tasks take LIGHT_CPUS
        if hasattr(ctx, "use_datasource_v2"):
            ctx.use_datasource_v2 = False
        staged = stage_inputs(cfg.data, uri, n_records, rec_fp, cfg.cache.rows_per_shard, set(pending))
        nw = cfg.ray.writer_concurrency
        writer_actor = ray.remote(num_cpus=LIGHT_CPUS, max_restarts=0)(ShardWriter)
        writers = [
            writer_actor.remote(
                uri=uri,
                shard_ranges={k: plan[k] for k in pending if k % nw == j},
                top_k=cfg.cache.top_k,
                hidden_dtype=cfg.cache.hidden_dtype,
                layers=intermediate_layers(cfg.cache),
                job_fp=fp,
                salience=cfg.cache.salience,
            )
            for j in range(nw)
        ]
        # a quarter CPU per read task, like the other light stages: the teacher actors keep their CPUs
        ds = ray.data.read_parquet(staged, filesystem=fs, partitioning=None, num_cpus=LIGHT_CPUS)
        ds = ds.map_batches(
            Tokenize,
            fn_constructor_kwargs={
                "teacher": cfg.teacher,
                "max_prompt_length": cfg.cache.max_prompt_length,
                "max_length": cfg.cache.max_length,
            },
            batch_size=64,
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.tokenizer_concurrency),
            num_cpus=LIGHT_CPUS,
        )
        ds = ds.map_batches(
            TeacherForward,
            fn_constructor_kwargs={
                "teacher": cfg.teacher,
                "top_k": cfg.cache.top_k,
                "hidden_dtype": cfg.cache.hidden_dtype,
                "layers": intermediate_layers(cfg.cache),
                "head_chunk": cfg.cache.head_chunk,
                "threads": int(max(1, cfg.ray.cpus_per_actor)),
                "uri": uri,
                "probe_ids": probe,
                "writers": writers,
                "write_timeout_s": cfg.ray.task_timeout_s,
                "salience": cfg.cache.salience,
            },
            batch_size=cfg.ray.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.concurrency),
            num_gpus=cfg.ray.gpus_per_actor,
            num_cpus=cfg.ray.cpus_per_actor,
        )
        try:
            for row in ds.iter_rows():
                entry = json.loads(row["entry"])
                done[entry["index"]] = entry
                print(
                    f"[teacher_cache] shard {entry['index'] + 1}/{len(plan)} written ({entry['rows']} rows, "
                    f"{entry['bytes'] / 1e6:.1f} MB)",
                    flush=True,
                )
            for w in ray.get([w.completed.remote() for w in writers], timeout=cfg.ray.task_timeout_s):
                for e in map(json.loads, w):
                    done[e["index"]] = e
            left = {k: v for w in ray.get([w.open_shards.remote() for w in writers]) for k, v in w.items()}
        finally:  # a failed run must not leave writers holding CPUs and rows in a long-lived cluster
            for w in writers:
                ray.kill(w)
        if left:
            raise RuntimeError(
                f"shards {sorted(left)} were left incomplete by the writers (rows held: {left})"
            )

    else:
        # every shard exists (a run died before its manifest): describe the teacher in a task of its own,
        # which also refuses weights that differ from the ones the shards were written with
        describe_remote = ray.remote(num_gpus=cfg.ray.gpus_per_actor, num_cpus=cfg.ray.cpus_per_actor)(
            _describe_teacher
        )
        ref = describe_remote.remote(cfg.teacher, uri, probe)
        try:
            ray.get(ref, timeout=cfg.ray.task_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            ray.cancel(ref, force=True)
            raise RuntimeError(
                f"describing the teacher (loading it to check its weights against the finished shards) took more "
                f"than ray.task_timeout_s={cfg.ray.task_timeout_s:g} s; raise it for a very large teacher, or check "
                "the worker's log (ray logs) for a stuck load"
            ) from e
    teacher_info = storage.read_json(fs, storage.join(root, TEACHER_INFO))

    missing = [i for i in range(len(plan)) if i not in done]
    if missing:
        raise RuntimeError(f"{uri}: shards {missing} were not written; re-run the job to complete the cache")
    settings = Settings(
        max_length=cfg.cache.max_length,
        max_prompt_length=cfg.cache.max_prompt_length,
        top_k=cfg.cache.top_k,
        hidden_dtype=cfg.cache.hidden_dtype,
        rows_per_shard=cfg.cache.rows_per_shard,
        layers=(-1, *intermediate_layers(cfg.cache)) if intermediate_layers(cfg.cache) else ("final",),
        salience=cfg.cache.salience,
    )
    source = {
        "path": cfg.data.path,
        "format": cfg.data.format,
        "split": cfg.data.split,
        "prompt_template": "as in the source (dskd) / Alpaca-MiniLLM (dolly); see pipeline.records",
        "records_fingerprint": rec_fp,
        "read": stats.read,
        "kept": stats.kept,
        "skipped_empty": stats.skipped_empty,
        "duplicates": stats.duplicates,
    }
    manifest = build_manifest(
        fingerprint=fp,
        settings=settings,
        teacher_info=teacher_info,
        tokenizer=tok_facts,
        source=source,
        shard_entries=[done[i] for i in range(len(plan))],
        files={**teacher_info["files"], **write_tokenizer(uri, tok)},
        seconds=time.time() - t0,
    )
    write_manifest(uri, manifest)
    if storage.exists(fs, storage.join(root, STAGING_DIR)):  # the staged input rows are in the shards now
        fs.delete_dir(storage.join(root, STAGING_DIR))
    s = manifest.stats
    print(
        f"[teacher_cache] done: {s.rows} rows ({s.truncated_prompt} prompts and {s.truncated_total} "
        f"sequences cut to the token limits), {s.positions} positions, {s.bytes / 1e6:.1f} MB of shards, "
        f"{s.bytes_per_position:.0f} B/position ({cfg.cache.hidden_dtype} hidden) -> {uri}"
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m teacher_cache.job",
        description="Run the teacher once over the data and write a reusable teacher cache (Arrow shards).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value):\n" + "\n".join(describe(CacheJobConfig)),
    )
    parser.add_argument("--config", help="YAML config (configs/cache/*.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. ray.batch_size=4 cache.hidden_dtype=int8"
    )
    args = parser.parse_args(argv)
    try:  # a user mistake in the config: one line, not a traceback
        cfg = load_config(CacheJobConfig, args.config, args.overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if args.print_config:
        print_config(to_dict(cfg))
        return 0
    run(cfg, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
