"""Streaming the teacher cache into student batches.

Order is a pure function of (seed, epoch, rank, world size): each rank owns the cache shards
``rank, rank + world, ...`` (no overlap, no gap); shard order is permuted per epoch and rows are shuffled
inside windows of ``shuffle_buffer`` rows, so only a window of rows is ever decoded at once. Every rank
yields the same number of batches per epoch (the smallest rank's count; the rest is dropped and counted),
which keeps collectives in step. The data cursor ``(epoch, batches consumed in that epoch)`` fully
determines the next batch, so a resumed run continues exactly where it stopped.

DataLoader workers split a rank's batches round-robin (batch ``j`` is built by worker ``j % workers``),
which is the order the DataLoader returns them in; each worker opens only the shards it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.tokenize import IGNORE_INDEX, tokenize_pair
from student_train.align import BatchAlignment, check_offsets
from student_train.spans import response_chunks, sample_spans
from teacher_cache.format import CachedRow


@dataclass
class DistillBatch:
    """One micro-batch, student and teacher side of the same samples in the same order.

    Student (``n`` = longest student sequence in the batch minus one):
        input_ids ``[B, n]`` long, right-padded with the pad id; attention_mask ``[B, n]``;
        position_ids ``[B, n]`` (0..n-1); labels ``[B, n]`` long, ``-100`` on prompt and pad positions
        (position ``|p|-1`` predicts the first response token, METHOD.md §1).
    Teacher (``m`` = longest teacher sequence minus one; absent for SFT without a cache):
        t_input_ids ``[B, m]`` long; t_labels ``[B, m]`` long (-100 outside the response); t_mask
        ``[B, m]`` (1 on real positions); t_hidden ``[B, m, d_T]`` float32 cached final hidden states
        (zeros on pad rows); t_topk_logprobs ``[B, m, k]`` cached top-k log-probs and t_topk_ids ``[B, m, k]`` their ids (only when asked for).
    Alignments (only when the objective needs them, :class:`student_train.align.BatchAlignment`):
        aligned_positions ``[B, n]`` long, the character-offset pairing; mined_positions ``[B, n]`` long,
        MinED's edit-distance alignment; both teacher positions, ``-1`` where there is none.
        t_layers ``{layer: [B, m, d_T]}`` cached intermediate teacher layers; t_entropy ``[B, m]``;
        word_spans / phrase_spans ``([B, n], [B, m])`` long span ids (:func:`student_train.spans.sample_spans`,
        over prompt and response), ``-1`` = none; span_fallbacks: samples whose phrases are their words (the
        chunker could not parse the text). t_salience ``{layer: [B, m]}`` cached attention salience (-1 =
        final); chunk_spans ``([B, n], [B, m])`` ids of the response chunks both tokenizations cut at (SRA).
    sample_ids: the B cache keys.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    sample_ids: list[str]
    t_input_ids: torch.Tensor | None = None
    t_labels: torch.Tensor | None = None
    t_mask: torch.Tensor | None = None
    t_hidden: torch.Tensor | None = None
    t_topk_logprobs: torch.Tensor | None = None
    t_topk_ids: torch.Tensor | None = None
    aligned_positions: torch.Tensor | None = None
    mined_positions: torch.Tensor | None = None
    t_layers: dict[int, torch.Tensor] | None = None
    t_salience: dict[int, torch.Tensor] | None = None
    t_entropy: torch.Tensor | None = None
    chunk_spans: tuple[torch.Tensor, torch.Tensor] | None = None
    word_spans: tuple[torch.Tensor, torch.Tensor] | None = None
    phrase_spans: tuple[torch.Tensor, torch.Tensor] | None = None
    cut_vs_teacher: int = 0
    span_fallbacks: int = 0

    @property
    def num_label_tokens(self) -> int:
        return int(self.labels.ne(IGNORE_INDEX).sum())

    def to(self, device) -> DistillBatch:
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, tuple):
                return tuple(move(x) for x in v)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v

        return DistillBatch(**{k: move(v) for k, v in vars(self).items()})


def _labels_for(ids: np.ndarray, response_start: int) -> np.ndarray:
    """Next-token labels of ``ids[:-1]``: ``ids[1:]`` with prompt targets masked (first valid at |p|-1)."""
    labels = ids[1:].astype(np.int64).copy()
    labels[: max(0, response_start - 1)] = IGNORE_INDEX
    return labels


def collate_kwargs(cfg, tokenizer, *, with_teacher: bool, alignment: BatchAlignment | None = None) -> dict:
    """The keyword arguments of :func:`collate` for a training config (a ``TrainConfig``) and its tokenizer."""
    from pipeline.tokenize import eos_id_of

    return dict(
        tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id,
        eos_id=eos_id_of(tokenizer, cfg.student.eos_token),
        max_prompt_length=cfg.student.max_prompt_length,
        max_length=cfg.student.max_length,
        with_teacher=with_teacher,
        alignment=alignment,
        truncation=cfg.data.truncation,
    )


def collate(
    rows: list,
    tokenizer,
    *,
    pad_id: int,
    eos_id: int,
    max_prompt_length: int,
    max_length: int,
    with_teacher: bool,
    alignment: BatchAlignment | None = None,
    truncation: str = "error",
) -> DistillBatch:
    """Student-tokenise rows (CachedRow or Record) and pad both sides into a :class:`DistillBatch`."""
    s_ids, s_labels, s_offsets, s_starts, cut = [], [], [], [], 0
    for r in rows:
        t = tokenize_pair(
            tokenizer,
            r.prompt,
            r.response,
            max_prompt_length=max_prompt_length,
            max_length=max_length,
            eos_id=eos_id,
        )
        if len(t.input_ids) < 2:
            raise ValueError(f"sample {r.sample_id}: fewer than 2 student tokens after truncation")
        s_ids.append(t.input_ids[:-1].astype(np.int64))
        s_labels.append(_labels_for(t.input_ids, t.response_start))
        s_offsets.append(t.offsets)
        s_starts.append(t.response_start)
        if with_teacher:
            check_offsets(r.offsets, len(r.prompt) + len(r.response), f"sample {r.sample_id}: teacher")
            short = _shorter_than_teacher(t, r)
            if short and truncation == "error":
                raise ValueError(
                    f"sample {r.sample_id}: the student's token limits keep {short}; raise student.max_length / "
                    "student.max_prompt_length, or set data.truncation=warn to train on and count such samples"
                )
            cut += bool(short)
    n = max(len(x) for x in s_ids)
    bsz = len(rows)
    input_ids = torch.full((bsz, n), pad_id, dtype=torch.long)
    labels = torch.full((bsz, n), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((bsz, n), dtype=torch.long)
    for i, (x, y) in enumerate(zip(s_ids, s_labels)):
        input_ids[i, : len(x)] = torch.from_numpy(x)
        labels[i, : len(y)] = torch.from_numpy(y)
        attn[i, : len(x)] = 1
    batch = DistillBatch(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=torch.arange(n).expand(bsz, n).contiguous(),
        labels=labels,
        sample_ids=[r.sample_id for r in rows],
    )
    if not with_teacher:
        return batch
    m = max(len(r.input_ids) - 1 for r in rows)
    t_ids = torch.zeros((bsz, m), dtype=torch.long)
    t_labels = torch.full((bsz, m), IGNORE_INDEX, dtype=torch.long)
    t_mask = torch.zeros((bsz, m), dtype=torch.long)
    for i, r in enumerate(rows):
        p = len(r.input_ids) - 1
        t_ids[i, :p] = torch.from_numpy(r.input_ids[:-1].astype(np.int64))
        t_labels[i, :p] = torch.from_numpy(_labels_for(r.input_ids, r.response_start))
        t_mask[i, :p] = 1
    batch.t_input_ids, batch.t_labels, batch.t_mask = t_ids, t_labels, t_mask
    batch.t_hidden = pad_positions(rows, "hidden", m)
    batch.cut_vs_teacher = cut
    if alignment is None:
        return batch
    if alignment.topk:
        batch.t_topk_logprobs = pad_positions(rows, "topk_logprobs", m)
        batch.t_topk_ids = _pad([np.asarray(r.topk_ids, np.int64) for r in rows], m).long()  # ids < 2**24
    if alignment.layers:
        batch.t_layers = {n: _pad([r.layers[n] for r in rows], m) for n in alignment.layers}
    if alignment.entropy:
        batch.t_entropy = pad_positions(rows, "entropy", m)
    if alignment.salience:
        batch.t_salience = {n: _pad([r.salience[n] for r in rows], m) for n in alignment.salience}
    if alignment.chunks:
        s_chunks = torch.full((bsz, n), -1, dtype=torch.long)
        t_chunks = torch.full((bsz, m), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            s_new, t_new = response_chunks(
                r.prompt + r.response,
                s_offsets[i],
                s_starts[i],
                len(s_ids[i]),
                r.offsets,
                r.response_start,
                len(r.input_ids) - 1,
            )
            s_chunks[i, : len(s_ids[i])] = torch.from_numpy(s_new[: len(s_ids[i])])
            t_chunks[i, : len(r.input_ids) - 1] = torch.from_numpy(t_new[: len(r.input_ids) - 1])
        batch.chunk_spans = (s_chunks, t_chunks)
    if alignment.spans:
        found = [
            sample_spans(r.prompt + r.response, s_offsets[i], len(s_ids[i]), r.offsets, len(r.input_ids) - 1)
            for i, r in enumerate(rows)
        ]
        kinds = {}
        for kind, width in (
            ("word_student", n),
            ("word_teacher", m),
            ("phrase_student", n),
            ("phrase_teacher", m),
        ):
            ids = torch.full((bsz, width), -1, dtype=torch.long)
            for i, f in enumerate(found):
                got = getattr(f, kind)
                ids[i, : len(got)] = torch.from_numpy(got)
            kinds[kind] = ids
        batch.word_spans = (kinds["word_student"], kinds["word_teacher"])
        batch.phrase_spans = (kinds["phrase_student"], kinds["phrase_teacher"])
        batch.span_fallbacks = sum(f.fallback for f in found)
    if alignment.offsets or alignment.mined is not None:
        pos = {
            "offsets": torch.full((bsz, n), -1, dtype=torch.long),
            "mined": torch.full((bsz, n), -1, dtype=torch.long),
        }
        for i, r in enumerate(rows):
            s_pos = np.flatnonzero(s_labels[i] != IGNORE_INDEX)
            t_pos = np.flatnonzero(t_labels[i].numpy() != IGNORE_INDEX)
            try:
                found = alignment.sample(
                    s_ids[i],
                    s_offsets[i],
                    s_pos,
                    r.input_ids,
                    r.offsets,
                    t_pos,
                    len(r.prompt) + len(r.response),
                )
            except ValueError as e:
                raise ValueError(f"sample {r.sample_id}: cannot align student and teacher tokens: {e}") from e
            for kind, vals in found.items():
                pos[kind][i, torch.from_numpy(s_pos)] = torch.from_numpy(vals)
        if alignment.offsets:
            batch.aligned_positions = pos["offsets"]
        if alignment.mined is not None:
            batch.mined_positions = pos["mined"]
    return batch


def pad_positions(rows: list[CachedRow], column: str, width: int) -> torch.Tensor:
    """Per-position column ``column`` of each row as one float32 tensor ``[B, width, ...]``, zeros past each
    row's ``P`` positions (the pad rows that ``t_mask`` marks)."""
    return _pad([getattr(r, column) for r in rows], width)


def _writable(cell) -> np.ndarray:
    """``cell`` as float32; a read-only view of a memory-mapped shard (float32 columns) is copied, since torch
    warns on (and could write through) a non-writable array."""
    arr = np.asarray(cell, np.float32)
    return arr if arr.flags.writeable else arr.copy()


def _pad(cells: list, width: int) -> torch.Tensor:
    cells = [c.float() if isinstance(c, torch.Tensor) else torch.from_numpy(_writable(c)) for c in cells]
    out = torch.zeros((len(cells), width, *cells[0].shape[1:]), dtype=torch.float32)
    for i, cell in enumerate(cells):
        out[i, : len(cell)] = cell
    return out


def _text_end(ids: np.ndarray, offsets: np.ndarray, start: int, stop: int) -> int:
    """Character end of the tokens ``start..stop-1`` that have a non-empty span (0 if none)."""
    spans = np.asarray(offsets)[start:stop]
    spans = spans[spans[:, 1] > spans[:, 0]]
    return int(spans[:, 1].max()) if len(spans) else 0


def _shorter_than_teacher(student, row) -> str:
    """'' when the student keeps at least the text the teacher saw, else what it loses (for messages)."""
    s_prompt = _text_end(student.input_ids, student.offsets, 0, student.response_start)
    t_prompt = _text_end(row.input_ids, row.offsets, 0, row.response_start)
    s_end = _text_end(student.input_ids, student.offsets, 0, len(student.input_ids))
    t_end = _text_end(row.input_ids, row.offsets, 0, len(row.input_ids))
    if s_prompt < t_prompt:
        return f"{s_prompt} prompt characters where the teacher saw {t_prompt}"
    if s_end < t_end:
        return f"{s_end} characters where the teacher saw {t_end}"
    return ""


class Schedule:
    """The deterministic per-rank sample order of an epoch, computed from shard row counts only (no I/O)."""

    def __init__(
        self, shard_rows: list[int], rank: int, world: int, micro_batch: int, seed: int, shuffle_buffer: int
    ):
        self.shard_rows, self.rank, self.world = shard_rows, rank, world
        self.micro_batch, self.seed, self.buffer = micro_batch, seed, shuffle_buffer
        per_rank = [sum(shard_rows[s] for s in range(r, len(shard_rows), world)) for r in range(world)]
        self.batches_per_epoch = min(per_rank) // micro_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"rank shares of the cache have {per_rank} rows: fewer than one micro-batch of {micro_batch} for "
                f"some rank with world size {world}; use a smaller micro_batch, fewer ranks, or a cache with more/smaller shards"
            )
        self.dropped_per_epoch = sum(per_rank) - self.batches_per_epoch * micro_batch * world

    def order(self, epoch: int) -> list[tuple[int, int]]:
        """(shard position, row) pairs of this rank for ``epoch``, truncated to whole batches."""
        mine = list(range(self.rank, len(self.shard_rows), self.world))
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        if self.buffer > 0:
            mine = [mine[i] for i in rng.permutation(len(mine))]
        items = [(s, r) for s in mine for r in range(self.shard_rows[s])]
        if self.buffer > 0:
            for a in range(0, len(items), self.buffer):
                window = items[a : a + self.buffer]
                items[a : a + self.buffer] = [window[i] for i in rng.permutation(len(window))]
        return items[: self.batches_per_epoch * self.micro_batch]


class CacheRows:
    """Row source over a teacher cache: decodes (shard, row) pairs, keeping a few memory-mapped shards open."""

    def __init__(self, cache):
        self.cache = cache
        self.shard_rows = cache.shard_rows
        self.tables: dict[int, object] = {}

    def get(self, pairs: list[tuple[int, int]]) -> list[CachedRow]:
        from teacher_cache.format import decode_row

        rows = []
        for s, r in pairs:
            if s not in self.tables:
                if len(self.tables) > 4:
                    self.tables.pop(next(iter(self.tables)))
                self.tables[s] = self.cache.open_shard(s).combine_chunks().to_batches()[0]
            rows.append(decode_row(self.tables[s], r, self.cache.layout))
        return rows


class RecordRows:
    """Row source over in-memory records (SFT without a cache): record ``i`` is pseudo-shard ``i``."""

    def __init__(self, records: list):
        self.records = records
        self.shard_rows = [1] * len(records)

    def get(self, pairs: list[tuple[int, int]]) -> list:
        return [self.records[s] for s, _ in pairs]


def open_rows(cfg, rank: int, world: int):
    """The run's row source and its cache: the teacher cache named by ``data.cache`` (checked against what
    the config expects; this rank's shards checksummed when ``data.verify_checksums``), or, for SFT without
    a cache, the records of ``data.sft_path`` (cache ``None``)."""
    from pipeline.records import DataConfig, read_records
    from teacher_cache.reader import CacheExpectation, open_cache

    if not cfg.data.cache:
        return RecordRows(list(read_records(DataConfig(path=cfg.data.sft_path)))), None
    from student_train.align import teacher_layers_needed

    objective = cfg.objective_config()
    expect = CacheExpectation(
        teacher_name=cfg.data.expect_teacher,
        tokenizer_sha256=cfg.data.expect_tokenizer_sha256,
        layers=teacher_layers_needed(objective),
        salience=objective.sra_enabled,
    )
    cache = open_cache(cfg.data.cache, expect=expect)
    if cfg.data.verify_checksums:
        cache.verify(cache.shard_indices_for(rank, world))
    return CacheRows(cache), cache


class ScheduledBatches(torch.utils.data.IterableDataset):
    """Yields collated :class:`DistillBatch` es of one rank for one epoch, starting at ``start_batch``.

    ``source`` is a :class:`CacheRows` (or, for ``with_teacher=False`` only, a :class:`RecordRows`); a
    teacher cache may also be passed directly.
    """

    def __init__(self, source, schedule: Schedule, epoch: int, start_batch: int, collate_kw: dict):
        self.source = source if hasattr(source, "get") else CacheRows(source)
        self.schedule, self.epoch, self.start, self.collate_kw = schedule, epoch, start_batch, collate_kw

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[DistillBatch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        order = self.schedule.order(self.epoch)
        mb = self.schedule.micro_batch
        for j in range(self.start, self.schedule.batches_per_epoch):
            if (j - self.start) % nw == wid:
                yield collate(self.source.get(order[j * mb : (j + 1) * mb]), **self.collate_kw)


CacheBatches = ScheduledBatches  # the common case: a cache as the source
