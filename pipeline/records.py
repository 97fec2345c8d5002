"""Record readers: every source becomes ``Record(sample_id, prompt, response, references)``.

Supported sources (``DataConfig.format``):

* ``dskd``   DSKD/MiniLLM jsonl: ``prompt`` (template already applied), ``output`` as a string or a list
  of references (the first reference is the training response, all are kept for evaluation).
* ``dolly``  raw Dolly jsonl: ``instruction``, ``context``, ``response``; the prompt is built with the
  Alpaca/MiniLLM template of METHOD.md §1.
* ``parquet`` a parquet file with either of the two column layouts above.
* ``hf``     a Hugging Face dataset id (or local dataset directory) loaded with ``datasets.load_dataset``;
  rows with either layout. Needs a machine that reaches the hub for remote ids.
* ``auto``   choose from the file suffix (``.jsonl``/``.json`` -> per-row layout detection, ``.parquet``).

Policies (counted in :class:`ReadStats` and in the cache manifest):

* A malformed line (bad JSON, missing fields, wrong types) is an error naming the file and line.
* An empty response (after stripping whitespace) is skipped and counted (``on_empty="skip"``, the
  default) or is an error (``on_empty="error"``).
* Exact duplicate (prompt, response) pairs share a sample id; later copies are dropped and counted,
  so sample ids are unique keys of the cache.
* Over-long texts are not dropped here: tokenisation truncates the prompt to ``max_prompt_length``
  tokens and the whole sequence to ``max_length`` tokens of each tokenizer (METHOD.md §1); those
  truncations are counted by the tokeniser.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import field as cfield

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


class RecordError(ValueError):
    """A source record is malformed; the message names the file and line (or row)."""


@dataclass(frozen=True)
class Record:
    """One normalised training/evaluation example.

    Attributes:
        sample_id: stable content hash of (prompt, response): the key of a row in the teacher cache.
        prompt: the full prompt text, template applied.
        response: the training target (first reference).
        references: every reference response (evaluation takes the max ROUGE-L over them).
    """

    sample_id: str
    prompt: str
    response: str
    references: tuple[str, ...] = ()


def sample_id_of(prompt: str, response: str) -> str:
    """Stable content hash of a (prompt, response) pair: 32 hex chars of sha256 over a canonical JSON."""
    payload = json.dumps([prompt, response], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def alpaca_prompt(instruction: str, context: str | None) -> str:
    """The MiniLLM/DSKD Alpaca template (METHOD.md §1)."""
    if context and context.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class DataConfig:
    """Where the records come from and what to do with awkward ones."""

    path: str = cfield("", help="jsonl/parquet file, local dataset dir, or HF dataset id (format=hf)")
    format: Literal["auto", "dskd", "dolly", "parquet", "hf"] = cfield("auto", help="record layout / reader")
    split: str = cfield("train", help="split name for format=hf")
    max_records: int | None = cfield(None, help="read at most this many records (after skipping)")
    on_empty: Literal["skip", "error"] = cfield("skip", help="policy for records with an empty response")

    def validate(self) -> None:
        if not self.path:
            raise ValueError("data.path is empty: point it at a jsonl/parquet file or a dataset id")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"data.max_records must be >= 1 or null, got {self.max_records}")


@dataclass
class ReadStats:
    """Counts kept by the readers; written into the cache manifest."""

    read: int = 0
    kept: int = 0
    skipped_empty: int = 0
    duplicates: int = 0
    per_layout: dict[str, int] = field(default_factory=dict)


def _as_str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: field '{what}' must be a string, found {type(value).__name__}")
    return value


def normalise_row(
    row: dict[str, Any], where: str, layout: str = "auto"
) -> tuple[str, str, tuple[str, ...], str]:
    """Map one raw row to (prompt, response, references, layout_used); raises RecordError naming ``where``."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, found {type(row).__name__}")
    if layout == "auto":
        if "prompt" in row and "output" in row:
            layout = "dskd"
        elif "instruction" in row and "response" in row:
            layout = "dolly"
        else:
            raise RecordError(
                f"{where}: cannot tell the record layout; expected fields (prompt, output) [DSKD/MiniLLM] or "
                f"(instruction, context, response) [raw Dolly], found {sorted(row)}"
            )
    if layout == "dskd":
        for k in ("prompt", "output"):
            if k not in row:
                raise RecordError(f"{where}: DSKD record lacks field '{k}' (fields: {sorted(row)})")
        prompt = _as_str(row["prompt"], "prompt", where)
        out = row["output"]
        if isinstance(out, list):
            if not out:
                refs: tuple[str, ...] = ("",)
            else:
                refs = tuple(_as_str(o, "output[]", where) for o in out)
        else:
            refs = (_as_str(out, "output", where),)
        return prompt, refs[0], refs, layout
    if layout == "dolly":
        for k in ("instruction", "response"):
            if k not in row:
                raise RecordError(f"{where}: Dolly record lacks field '{k}' (fields: {sorted(row)})")
        instruction = _as_str(row["instruction"], "instruction", where)
        context = row.get("context") or row.get("input") or ""
        context = _as_str(context, "context", where)
        response = _as_str(row["response"], "response", where)
        return alpaca_prompt(instruction, context), response, (response,), layout
    raise RecordError(f"{where}: unknown layout {layout!r}")


def _iter_raw(cfg: DataConfig) -> Iterator[tuple[dict[str, Any], str]]:
    fmt = cfg.format
    path = Path(cfg.path)
    if fmt == "auto":
        if path.suffix in (".jsonl", ".json"):
            fmt = "jsonl"
        elif path.suffix == ".parquet":
            fmt = "parquet"
        else:
            raise RecordError(
                f"data.path {cfg.path}: cannot infer the format from the suffix {path.suffix!r}; "
                "set data.format to one of dskd, dolly, parquet, hf"
            )
    if fmt in ("jsonl", "dskd", "dolly"):
        if not path.exists():
            raise FileNotFoundError(f"data.path {path} does not exist")
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RecordError(
                        f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        "re-encode the file as UTF-8"
                    ) from e
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
                yield row, where
    elif fmt == "parquet":
        if not path.exists():
            raise FileNotFoundError(f"data.path {path} does not exist")
        import pyarrow.dataset as pads

        i = 0  # a file or a folder of files, as a stream of batches (not the whole table), in file order
        for batch in pads.dataset(str(path), format="parquet").to_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield row, f"{path}:row {i}"
                i += 1
    elif fmt == "hf":
        import datasets

        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))  # a dataset saved with save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        for i, row in enumerate(ds):
            yield dict(row), f"{cfg.path}[{cfg.split}]:row {i}"
    else:  # pragma: no cover - Literal already checked
        raise RecordError(f"unknown data.format {fmt!r}")


def read_records(cfg: DataConfig, stats: ReadStats | None = None) -> Iterator[Record]:
    """Yield normalised, de-duplicated records of ``cfg`` in source order (see module doc for policies)."""
    stats = stats if stats is not None else ReadStats()
    layout = cfg.format if cfg.format in ("dskd", "dolly") else "auto"
    seen = SeenIds()
    for row, where in _iter_raw(cfg):
        stats.read += 1
        prompt, response, refs, used = normalise_row(row, where, layout)
        stats.per_layout[used] = stats.per_layout.get(used, 0) + 1
        if not response.strip():
            if cfg.on_empty == "error":
                raise RecordError(f"{where}: empty response (set data.on_empty=skip to skip such records)")
            stats.skipped_empty += 1
            continue
        sid = sample_id_of(prompt, response)
        if not seen.add(sid):
            stats.duplicates += 1
            continue
        stats.kept += 1
        yield Record(sid, prompt, response, refs)
        if cfg.max_records is not None and stats.kept >= cfg.max_records:
            return


def records_fingerprint(records: Iterable[Record]) -> str:
    """sha256 over the ordered sample ids: identifies the normalised data of a cache (one pass, any iterable)."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.sample_id.encode())
    return h.hexdigest()


class SeenIds:
    """The sample ids met so far, 16 bytes each: a sorted array plus a small set merged into it in bulk.

    De-duplication has to remember every id of the source; a Python ``set`` of 32-character strings costs
    ~110 bytes per record, this ~16 (about 3 MB per 200k records), so reading a corpus of millions of
    records keeps the reader's memory nearly flat.
    """

    def __init__(self, merge_every: int = 1 << 16):
        self._sorted = np.empty(0, dtype="S16")
        self._recent: set[bytes] = set()
        self._merge_every = merge_every

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, sample_id: str) -> bool:
        key = bytes.fromhex(sample_id)
        if key in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, key))
        return (
            i < len(self._sorted) and self._sorted[i : i + 1].tobytes() == key
        )  # S16 items drop trailing NULs

    def add(self, sample_id: str) -> bool:
        """Remember ``sample_id`` (32 hex characters); False when it was already there."""
        if sample_id in self:
            return False
        self._recent.add(bytes.fromhex(sample_id))
        if len(self._recent) >= self._merge_every:
            merged = np.concatenate([self._sorted, np.array(sorted(self._recent), dtype="S16")])
            merged.sort(kind="stable")
            self._sorted, self._recent = merged, set()
        return True
