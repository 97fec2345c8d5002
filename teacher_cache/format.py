"""Cache format v2 (reads v1): the column table, the Arrow schema derived from it, hidden-state codecs, rows in and out.

The full contract is documented in docs/CACHE_FORMAT.md; this module is its single implementation. Every
column of a shard is one row of :data:`COLUMNS`; the schema, the shard writer (:func:`build_table`), the
reader (:func:`decode_row`) and the Ray stages all read that table, so adding a column is one table row plus
the code that computes it. Per-position arrays have ``P = L - 1`` rows: position ``t`` holds the teacher's
state after reading ``input_ids[0..t]``, i.e. the state that predicts ``input_ids[t + 1]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = 2  # the newest version this code writes
READABLE_VERSIONS = (1, 2)


def schema_version(layers: tuple[int, ...], salience: bool = False) -> int:
    """A cache of the final state only is written as v1 (readable by v1 readers); intermediate layers or the
    attention salience columns make v2."""
    return 2 if layers or salience else 1


FORMAT_NAME = "xtokd-teacher-cache"
MANIFEST = "manifest.json"
JOB_STATE = "job_state.json"
SHARD_DIR = "shards"  # the Arrow IPC shards only: pyarrow.dataset / datasets read the folder as is
PROGRESS_DIR = "progress"  # the job's per-shard bookkeeping (sidecars); caches before it kept them in shards/
STAGING_DIR = "staging"  # the job's input rows per pending shard (parquet) for Ray Data; gone when it ends
HEAD_FILE = "teacher_head.safetensors"
EMBED_FILE = "teacher_embeddings.safetensors"
TOKENIZER_DIR = "teacher_tokenizer"  # the teacher tokenizer's files (MinED needs its token strings)
TEACHER_INFO = "teacher_info.json"  # job-time sidecar: the teacher description, copied into the manifest

HiddenDType = Literal["float32", "bfloat16", "float16", "int8"]
HIDDEN_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")
# numpy storage dtype of one hidden value; bfloat16 is stored as its raw 16 bits (Arrow has no bf16)
HIDDEN_STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16, "int8": np.int8}
BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
FLOAT16_MAX = 65504.0  # a hidden value beyond it would be stored as inf: refused


def shard_name(index: int) -> str:
    """Relative path of shard ``index`` inside a cache directory."""
    return f"{SHARD_DIR}/part-{index:05d}.arrow"


@dataclass(frozen=True)
class Layout:
    """The settings every column's type is derived from (one per cache, recorded in its manifest)."""

    hidden_size: int
    top_k: int
    hidden_dtype: str
    layers: tuple[int, ...] = ()  # intermediate teacher layers stored besides the final state (v2)
    salience: bool = False  # the attention salience of the final state and of every layer n >= 1 (v2)

    def __post_init__(self):
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}")
        if any(n < 0 for n in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"intermediate layers must be distinct indices >= 0, got {list(self.layers)}")


def layer_column(layer: int) -> str:
    """The column of teacher layer ``layer`` (HF ``hidden_states[layer]``: 0 = embeddings output)."""
    return f"hidden_layer_{layer}"


def salience_column(layer: int) -> str:
    """The salience column of teacher layer ``layer`` (``-1`` = the final state)."""
    return "salience" if layer == -1 else f"salience_layer_{layer}"


def salience_layers(layout: Layout) -> tuple[int, ...]:
    """The layers whose salience a cache stores: the final state (-1) and every intermediate layer n >= 1
    (layer 0, the embeddings' output, comes from no attention block)."""
    return (-1, *(n for n in layout.layers if n >= 1)) if layout.salience else ()


@dataclass(frozen=True)
class Column:
    """One column of a shard.

    Attributes:
        name: the Arrow column name, also the key of a row dict and the attribute of :class:`CachedRow`.
        per: ``"row"`` (one value per sample), ``"token"`` (``[L, ...]``) or ``"position"`` (``[P, ...]``).
        dtype: numpy dtype of the stored values, ``"str"`` for text, or ``"hidden"`` for the layout's hidden
            storage dtype (such a column gets a companion ``<name>_scale`` column when it is int8).
        width: the inner width of a 2-D array: an int or a :class:`Layout` attribute; ``None`` for 1-D.
        large: 64-bit offsets (``large_string``/``large_list``): hidden states pass 2**31 values per shard.
    """

    name: str
    per: Literal["row", "token", "position"]
    dtype: str
    width: int | str | None = None
    large: bool = False
    doc: str = ""

    def inner_width(self, layout: Layout) -> int | None:
        return getattr(layout, self.width) if isinstance(self.width, str) else self.width

    def numpy_dtype(self, layout: Layout):
        return HIDDEN_STORAGE[layout.hidden_dtype] if self.dtype == "hidden" else np.dtype(self.dtype)

    def arrow_type(self, layout: Layout) -> pa.DataType:
        if self.dtype == "str":
            return pa.large_string() if self.large else pa.string()
        value = pa.from_numpy_dtype(self.numpy_dtype(layout))
        if self.per == "row":
            return value
        width = self.inner_width(layout)
        if width is not None:
            value = pa.list_(value, width)
        return pa.large_list(value) if self.large else pa.list_(value)


COLUMNS: tuple[Column, ...] = (
    Column("sample_id", "row", "str", doc="sha256 (32 hex) of the canonical JSON [prompt, response]"),
    Column("source_index", "row", "int64", doc="position of the record in the normalised source"),
    Column("prompt", "row", "str", large=True, doc="prompt text, template applied, before truncation"),
    Column("response", "row", "str", large=True, doc="response text, before truncation"),
    Column("input_ids", "token", "int32", doc="teacher token ids: prompt, response, EOS (truncated)"),
    Column("offsets", "token", "int32", 2, doc="character span of each token in prompt + response"),
    Column("response_start", "row", "int32", doc="index of the first response token in input_ids"),
    Column(
        "hidden", "position", "hidden", "hidden_size", large=True, doc="final hidden states (after the norm)"
    ),
    Column("topk_ids", "position", "int32", "top_k", doc="top-k next-token ids, descending"),
    Column("topk_logprobs", "position", "float32", "top_k", doc="their log-probabilities"),
    Column("logsumexp", "position", "float32", doc="log-partition of the full logits"),
    Column("entropy", "position", "float32", doc="entropy (nats) of the full next-token distribution"),
)


@functools.lru_cache(maxsize=64)
def columns(layout: Layout) -> tuple[Column, ...]:
    """The columns of a shard with this layout, in schema order: the table, then one hidden column per
    intermediate layer; every int8 hidden column brings its per-token scale column."""
    layer_cols = [
        Column(layer_column(n), "position", "hidden", "hidden_size", large=True, doc=f"teacher layer {n}")
        for n in layout.layers
    ]
    salience_cols = [
        Column(
            salience_column(n),
            "position",
            "float32",
            doc="attention the last real position pays to each position in the block that produced "
            f"{'the final state' if n == -1 else f'layer {n}'}, mean over heads (sums to 1 per row)",
        )
        for n in salience_layers(layout)
    ]
    out = []
    for c in [*COLUMNS, *layer_cols, *salience_cols]:
        out.append(c)
        if c.dtype == "hidden" and layout.hidden_dtype == "int8":
            out.append(Column(f"{c.name}_scale", c.per, "float32", doc=f"per-token scale of {c.name}"))
    return tuple(out)


def schema(layout: Layout) -> pa.Schema:
    """The Arrow schema of one shard for the given layout (see docs/CACHE_FORMAT.md)."""
    meta = {
        b"format": FORMAT_NAME.encode(),
        b"schema_version": str(schema_version(layout.layers, layout.salience)).encode(),
        b"hidden_dtype": layout.hidden_dtype.encode(),
    }
    return pa.schema(
        [pa.field(c.name, c.arrow_type(layout), nullable=False) for c in columns(layout)], metadata=meta
    )


def attention_salience(attn: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` the value of a salience column: the attention row of each sample's last real position, summed over heads and normalised
    to sum 1 (SRA's span salience, sonho4ng/SRAv4 ``utils.py``: the last real token, not the padded batch's
    last row). ``attn``: ``[B, H, P, P]`` attention probabilities of one block."""
    last = attention_mask.long().sum(1).clamp_min(1) - 1
    rows = attn[torch.arange(attn.shape[0], device=attn.device), :, last].float().sum(1)  # [B, P]
    rows = rows * attention_mask.to(rows.dtype)
    return rows / rows.sum(-1, keepdim=True).clamp_min(1e-30)


def encode_hidden(h: torch.Tensor, hidden_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode ``h`` ``[P, d]`` (any float dtype) for storage; returns (values, per-token scale or None).

    int8 uses a symmetric per-token scale ``max|h_t| / 127`` so that ``h ~= q * scale``.
    """
    h = h.detach().to("cpu")
    if hidden_dtype == "float32":
        return h.float().numpy(), None
    if hidden_dtype == "float16":
        peak = float(h.abs().max()) if h.numel() else 0.0
        if peak != peak:
            raise ValueError("hidden states contain NaN: the teacher forward is broken (check its dtype)")
        if peak > FLOAT16_MAX:
            raise ValueError(
                f"hidden states reach |h| = {peak:.4g}, beyond float16's range ({FLOAT16_MAX:g}; some models' "
                "intermediate layers carry such outliers): use cache.hidden_dtype=bfloat16 for this teacher"
            )
        return h.half().numpy(), None
    if hidden_dtype == "bfloat16":
        return h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    if hidden_dtype == "int8":
        hf = h.float()
        scale = hf.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
        q = torch.round(hf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.numpy(), scale.numpy().astype(np.float32)
    raise ValueError(f"unknown hidden dtype {hidden_dtype!r}")


def decode_hidden(values: np.ndarray, scale: np.ndarray | None, hidden_dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_hidden`: ``[P, d]`` stored values -> float32 tensor.

    ``values`` may come from any Arrow reader, also one that widened the stored integers (``datasets``
    returns bf16's raw uint16 bits as int64): they are narrowed back to the storage dtype first.
    """
    if hidden_dtype in HIDDEN_STORAGE:
        values = np.asarray(values).astype(HIDDEN_STORAGE[hidden_dtype], copy=False)
    if hidden_dtype == "float32":
        return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    if hidden_dtype == "float16":
        return torch.from_numpy(np.array(values, copy=True)).float()
    if hidden_dtype == "bfloat16":
        raw = np.array(values, copy=True).view(np.int16)  # copy: shard memory is read-only
        return torch.from_numpy(raw).view(torch.bfloat16).float()
    if hidden_dtype == "int8":
        if scale is None:
            raise ValueError("int8 hidden states need their per-token scale column")
        return (
            torch.from_numpy(np.array(values, copy=True)).float()
            * torch.from_numpy(np.array(scale, copy=True))[:, None]
        )
    raise ValueError(f"unknown hidden dtype {hidden_dtype!r}")


def encode_positions(name: str, values: torch.Tensor, layout: Layout) -> dict[str, np.ndarray]:
    """The stored array(s) of per-position column ``name`` from a ``[P, ...]`` tensor (a hidden column
    becomes its values and, for int8, its ``<name>_scale``)."""
    col = next((c for c in columns(layout) if c.name == name), None)
    if col is None:
        raise ValueError(f"no column {name!r} in a cache with layers {list(layout.layers)}")
    if col.dtype == "hidden":
        stored, scale = encode_hidden(values, layout.hidden_dtype)
        return {name: stored} if scale is None else {name: stored, f"{name}_scale": scale}
    return {name: values.detach().cpu().numpy().astype(col.numpy_dtype(layout), copy=False)}


@dataclass
class CachedRow:
    """One decoded cache row (teacher side of one sample); shapes with ``L`` tokens, ``P = L - 1``.

    One attribute per column of :data:`COLUMNS` (the int8 scales are consumed by decoding):
        sample_id: stable content hash of (prompt, response).
        source_index: position of the record in the normalised source.
        prompt, response: the texts the teacher saw (before token truncation).
        input_ids: ``[L]`` teacher token ids (prompt, response, EOS; truncated).
        offsets: ``[L, 2]`` character spans into ``prompt + response``.
        response_start: index of the first response token in ``input_ids``.
        hidden: ``[P, d_T]`` float32 final hidden states (decoded from the stored dtype).
        topk_ids, topk_logprobs: ``[P, k]`` top-k next-token ids and log-probs (temperature 1).
        logsumexp, entropy: ``[P]`` of the full next-token distribution at temperature 1.
        layers: ``{layer: [P, d_T] float32}`` the intermediate teacher layers the cache holds (v2; empty
            for a cache of the final state only).
        salience: ``{layer: [P] float32}`` attention salience per stored layer (-1 = final state; v2 caches
            built with ``cache.salience=true``, else empty).
    """

    sample_id: str
    source_index: int
    prompt: str
    response: str
    input_ids: np.ndarray
    offsets: np.ndarray
    response_start: int
    hidden: torch.Tensor
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    logsumexp: np.ndarray
    entropy: np.ndarray
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    salience: dict[int, np.ndarray] = field(default_factory=dict)


assert {f.name for f in fields(CachedRow)} - {"layers", "salience"} == {c.name for c in COLUMNS}, (
    "CachedRow must mirror COLUMNS"
)


def _list_array(col: Column, layout: Layout, arrays: list[np.ndarray]) -> pa.Array:
    flat = np.concatenate(arrays) if arrays else np.zeros((0,), col.numpy_dtype(layout))
    values = pa.array(flat.reshape(-1), type=pa.from_numpy_dtype(col.numpy_dtype(layout)))
    width = col.inner_width(layout)
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    offs = np.zeros(len(arrays) + 1, dtype=np.int64 if col.large else np.int32)
    np.cumsum([len(a) for a in arrays], out=offs[1:])
    cls = pa.LargeListArray if col.large else pa.ListArray
    return cls.from_arrays(pa.array(offs), values)


def build_table(rows: list[dict], layout: Layout) -> pa.Table:
    """Assemble rows (dicts: column name -> value; arrays in their stored dtype) into one Arrow table.

    Every array's length (``L`` per token, ``P = L - 1`` per position) and inner width are checked.
    """
    sch = schema(layout)
    cols = []
    for col in columns(layout):
        if col.per == "row":
            cols.append(pa.array([r[col.name] for r in rows], type=col.arrow_type(layout)))
            continue
        width, want_dtype = col.inner_width(layout), col.numpy_dtype(layout)
        arrays = []
        for r in rows:
            n = len(r["input_ids"]) - (col.per == "position")
            a = np.asarray(r[col.name])
            shape = (n,) if width is None else (n, width)
            if a.shape != shape:
                raise ValueError(
                    f"row {r['sample_id']}: column {col.name} has shape {a.shape}, expected {shape} "
                    f"({col.per} array of a {len(r['input_ids'])}-token row)"
                )
            arrays.append(a.astype(want_dtype, copy=False))
        cols.append(_list_array(col, layout, arrays))
    return pa.Table.from_arrays(cols, schema=sch)


def _cell(column: pa.Array | pa.ChunkedArray, col: Column, layout: Layout, i: int):
    """Row ``i`` of one column: a Python value, or a zero-copy numpy view ``[n]`` / ``[n, width]``."""
    if col.per == "row":
        return column[i].as_py()
    values = column[i].values
    width = col.inner_width(layout)
    if width is None:
        return values.to_numpy(zero_copy_only=False)
    flat = values.flatten() if len(values) else pa.array([], type=values.type.value_type)
    return flat.to_numpy(zero_copy_only=False).reshape(-1, width)


def decode_row(batch: pa.RecordBatch, i: int, layout: Layout) -> CachedRow:
    """Decode row ``i`` of a shard record batch into a :class:`CachedRow` (hidden states as float32)."""
    cols = columns(layout)
    raw = {c.name: _cell(batch.column(c.name), c, layout, i) for c in cols}
    for col in cols:
        if col.dtype == "hidden":
            raw[col.name] = decode_hidden(
                raw[col.name], raw.pop(f"{col.name}_scale", None), layout.hidden_dtype
            )
    raw["layers"] = {n: raw.pop(layer_column(n)) for n in layout.layers}
    raw["salience"] = {n: raw.pop(salience_column(n)) for n in salience_layers(layout)}
    return CachedRow(**raw)
