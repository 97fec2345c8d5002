"""Cache format v1: Arrow schema, hidden-state codecs, row building and decoding.

The full contract is documented in docs/CACHE_FORMAT.md; this module is its single implementation.
Per-position arrays have ``P = L - 1`` rows: position ``t`` holds the teacher's state after reading
``input_ids[0..t]``, i.e. the state that predicts ``input_ids[t + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = 1
FORMAT_NAME = "xtokd-teacher-cache"
MANIFEST = "manifest.json"
JOB_STATE = "job_state.json"
SHARD_DIR = "shards"
HEAD_FILE = "teacher_head.safetensors"
EMBED_FILE = "teacher_embeddings.safetensors"
TOKENIZER_DIR = "teacher_tokenizer"  # the teacher tokenizer's files (MinED needs its token strings)
TEACHER_INFO = "teacher_info.json"  # job-time sidecar: the teacher description, copied into the manifest

HiddenDType = Literal["float32", "bfloat16", "float16", "int8"]
HIDDEN_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")
# Arrow storage type of one hidden value; bfloat16 is stored as its raw 16 bits (Arrow has no bf16).
_STORAGE = {"float32": pa.float32(), "bfloat16": pa.uint16(), "float16": pa.float16(), "int8": pa.int8()}
BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def shard_name(index: int) -> str:
    """Relative path of shard ``index`` inside a cache directory."""
    return f"{SHARD_DIR}/part-{index:05d}.arrow"


def schema(hidden_size: int, top_k: int, hidden_dtype: str) -> pa.Schema:
    """The Arrow schema of one shard for the given settings (see docs/CACHE_FORMAT.md)."""
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden dtype must be one of {HIDDEN_DTYPES}, got {hidden_dtype!r}")
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("prompt", pa.large_string(), nullable=False),
        pa.field("response", pa.large_string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("offsets", pa.list_(pa.list_(pa.int32(), 2)), nullable=False),
        pa.field("response_start", pa.int32(), nullable=False),
        pa.field("hidden", pa.large_list(pa.list_(_STORAGE[hidden_dtype], hidden_size)), nullable=False),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), top_k)), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32(), top_k)), nullable=False),
        pa.field("logsumexp", pa.list_(pa.float32()), nullable=False),
        pa.field("entropy", pa.list_(pa.float32()), nullable=False),
    ]
    if hidden_dtype == "int8":
        fields.append(pa.field("hidden_scale", pa.list_(pa.float32()), nullable=False))
    meta = {
        b"format": FORMAT_NAME.encode(),
        b"schema_version": str(SCHEMA_VERSION).encode(),
        b"hidden_dtype": hidden_dtype.encode(),
    }
    return pa.schema(fields, metadata=meta)


def encode_hidden(h: torch.Tensor, hidden_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode ``h`` ``[P, d]`` (any float dtype) for storage; returns (values, per-token scale or None).

    int8 uses a symmetric per-token scale ``max|h_t| / 127`` so that ``h ~= q * scale``.
    """
    h = h.detach().to("cpu")
    if hidden_dtype == "float32":
        return h.float().numpy(), None
    if hidden_dtype == "float16":
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
    """Inverse of :func:`encode_hidden`: ``[P, d]`` stored values -> float32 tensor."""
    if hidden_dtype == "float32":
        return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    if hidden_dtype == "float16":
        return torch.from_numpy(np.array(values, copy=True)).float()
    if hidden_dtype == "bfloat16":
        raw = np.array(values, copy=True).view(np.int16)  # copy: shard memory is read-only
        return torch.from_numpy(raw).view(torch.bfloat16).float()
    if hidden_dtype == "int8":
        if scale is None:
            raise ValueError("int8 hidden states need their per-token scale column 'hidden_scale'")
        return (
            torch.from_numpy(np.array(values, copy=True)).float()
            * torch.from_numpy(np.array(scale, copy=True))[:, None]
        )
    raise ValueError(f"unknown hidden dtype {hidden_dtype!r}")


@dataclass
class CachedRow:
    """One decoded cache row (teacher side of one sample); shapes with ``L`` tokens, ``P = L - 1``.

    Attributes:
        sample_id: stable content hash of (prompt, response).
        source_index: position of the record in the normalised source.
        prompt, response: the texts the teacher saw (before token truncation).
        input_ids: ``[L]`` teacher token ids (prompt, response, EOS; truncated).
        offsets: ``[L, 2]`` character spans into ``prompt + response``.
        response_start: index of the first response token in ``input_ids``.
        hidden: ``[P, d_T]`` float32 final hidden states (decoded from the stored dtype).
        topk_ids, topk_logprobs: ``[P, k]`` top-k next-token ids and log-probs (temperature 1).
        logsumexp, entropy: ``[P]`` of the full next-token distribution at temperature 1.
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


def _list_array(
    flat: np.ndarray, lengths: list[int], inner: int | None, storage: pa.DataType, large: bool = False
):
    values = pa.array(flat.reshape(-1), type=storage)
    if inner is not None:
        values = pa.FixedSizeListArray.from_arrays(values, inner)
    offs = np.zeros(len(lengths) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(lengths, out=offs[1:])
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(pa.array(offs), values)


def build_table(rows: list[dict], hidden_size: int, top_k: int, hidden_dtype: str) -> pa.Table:
    """Assemble rows (dicts of numpy arrays, see :func:`encode_hidden`) into one Arrow table of the v1 schema."""
    sch = schema(hidden_size, top_k, hidden_dtype)
    n_tok = [len(r["input_ids"]) for r in rows]
    n_pos = [len(r["logsumexp"]) for r in rows]
    for r, lt, lp in zip(rows, n_tok, n_pos):
        if lp != lt - 1 or r["hidden"].shape != (lp, hidden_size):
            raise ValueError(
                f"row {r['sample_id']}: expected {lt - 1} positions of width {hidden_size}, "
                f"found hidden {r['hidden'].shape} and {lp} logsumexp values"
            )
    cat = np.concatenate
    cols = {
        "sample_id": pa.array([r["sample_id"] for r in rows], type=pa.string()),
        "source_index": pa.array([int(r["source_index"]) for r in rows], type=pa.int64()),
        "prompt": pa.array([r["prompt"] for r in rows], type=pa.large_string()),
        "response": pa.array([r["response"] for r in rows], type=pa.large_string()),
        "input_ids": _list_array(cat([r["input_ids"] for r in rows]), n_tok, None, pa.int32()),
        "offsets": _list_array(cat([r["offsets"] for r in rows]), n_tok, 2, pa.int32()),
        "response_start": pa.array([int(r["response_start"]) for r in rows], type=pa.int32()),
        "hidden": _list_array(
            cat([r["hidden"] for r in rows]), n_pos, hidden_size, _STORAGE[hidden_dtype], large=True
        ),
        "topk_ids": _list_array(cat([r["topk_ids"] for r in rows]), n_pos, top_k, pa.int32()),
        "topk_logprobs": _list_array(cat([r["topk_logprobs"] for r in rows]), n_pos, top_k, pa.float32()),
        "logsumexp": _list_array(cat([r["logsumexp"] for r in rows]), n_pos, None, pa.float32()),
        "entropy": _list_array(cat([r["entropy"] for r in rows]), n_pos, None, pa.float32()),
    }
    if hidden_dtype == "int8":
        cols["hidden_scale"] = _list_array(cat([r["hidden_scale"] for r in rows]), n_pos, None, pa.float32())
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def _rows_2d(col: pa.ChunkedArray | pa.Array, i: int, width: int) -> np.ndarray:
    """Zero-copy view of row ``i`` of a list<fixed_size_list<width>> column as ``[n, width]``."""
    scalar = col[i]
    inner = scalar.values  # FixedSizeListArray
    flat = inner.flatten() if len(inner) else pa.array([], type=inner.type.value_type)
    return flat.to_numpy(zero_copy_only=False).reshape(-1, width)


def decode_row(batch: pa.RecordBatch, i: int, hidden_dtype: str) -> CachedRow:
    """Decode row ``i`` of a shard record batch into a :class:`CachedRow` (hidden states as float32)."""
    d = batch.schema.field("hidden").type.value_type.list_size
    k = batch.schema.field("topk_ids").type.value_type.list_size
    col = batch.column
    scale = None
    if hidden_dtype == "int8":
        scale = col("hidden_scale")[i].values.to_numpy(zero_copy_only=False)
    return CachedRow(
        sample_id=col("sample_id")[i].as_py(),
        source_index=col("source_index")[i].as_py(),
        prompt=col("prompt")[i].as_py(),
        response=col("response")[i].as_py(),
        input_ids=col("input_ids")[i].values.to_numpy(zero_copy_only=False),
        offsets=_rows_2d(col("offsets"), i, 2),
        response_start=col("response_start")[i].as_py(),
        hidden=decode_hidden(_rows_2d(col("hidden"), i, d), scale, hidden_dtype),
        topk_ids=_rows_2d(col("topk_ids"), i, k),
        topk_logprobs=_rows_2d(col("topk_logprobs"), i, k),
        logsumexp=col("logsumexp")[i].values.to_numpy(zero_copy_only=False),
        entropy=col("entropy")[i].values.to_numpy(zero_copy_only=False),
    )
