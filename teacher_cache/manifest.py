"""The manifest of a teacher cache: its typed form, its validation, and how the job assembles it.

``manifest.json`` is a file people edit and copy, so :func:`parse_manifest` checks every field the readers
use (type, range, cross-checks against the shard list) and raises one :class:`CacheError` naming the field;
what it returns is a :class:`Manifest`, whose attributes replace ``manifest["stats"]["rows"]`` style
lookups. :meth:`Manifest.to_dict` is the JSON written to disk (unknown keys of an older or newer writer are
kept verbatim in ``extra``).
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from teacher_cache.format import (
    BYTES_PER_VALUE,
    FORMAT_NAME,
    HIDDEN_DTYPES,
    MANIFEST,
    SHARD_DIR,
    Layout,
    schema_version,
)


class CacheError(ValueError):
    """The cache is missing, incomplete, corrupt, or not the one the caller expects."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it (manifest order is shard order)."""

    file: str
    rows: int
    tokens: int
    positions: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class FileEntry:
    """A non-shard file of the cache (head, embeddings, tokenizer files)."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class Settings:
    """What the cache stores: token limits, top-k, hidden dtype, layers."""

    max_length: int
    max_prompt_length: int
    top_k: int
    hidden_dtype: str
    rows_per_shard: int
    layers: tuple = (-1,)  # teacher layers stored: -1 the final (normed) state, n >= 0 hidden_states[n]
    salience: bool = False  # attention salience columns (SRA); absent from the JSON when false
    positions: str = "P = L - 1 per row; position t predicts input_ids[t + 1]"


@dataclass(frozen=True)
class Stats:
    """Counts and sizes of the finished cache."""

    rows: int
    tokens: int
    positions: int
    truncated_prompt: int
    truncated_total: int
    bytes: int
    bytes_per_position: float
    hidden_bytes_per_position: int
    dense_fp16_logits_bytes_per_position: int
    job_seconds: float


@dataclass(frozen=True)
class Manifest:
    """A validated ``manifest.json``; ``teacher``, ``tokenizer`` and ``source`` are descriptive facts (dicts)
    of which the readers use ``teacher['name'|'hidden_size'|'head_rows'|'weights_fingerprint']`` and
    ``tokenizer['sha256'|'eos_id']`` (all validated)."""

    format: str
    schema_version: int
    created: str
    job_fingerprint: str
    teacher: dict
    tokenizer: dict
    source: dict
    settings: Settings
    stats: Stats
    shards: tuple[ShardEntry, ...]
    files: dict[str, FileEntry]
    extra: dict = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        """The column layout of every shard of this cache."""
        extra = tuple(n for n in self.settings.layers if n not in (-1, "final"))
        return Layout(
            self.teacher["hidden_size"],
            self.settings.top_k,
            self.settings.hidden_dtype,
            extra,
            self.settings.salience,
        )

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer["eos_id"])

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        out["settings"]["layers"] = list(self.settings.layers)
        if not self.settings.salience:
            out["settings"].pop("salience")
        out["shards"] = [asdict(s) for s in self.shards]
        return {**self.extra, **out}


# --------------------------------------------------------------------------- validation
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SHARD_FILE = re.compile(rf"^{SHARD_DIR}/part-\d{{5}}\.arrow$")
_PLAIN_FILE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")


def _fail(uri: str, where: str, why: str):
    raise CacheError(f"{uri}: manifest field {where} {why}; the manifest was edited or is damaged")


def _need(uri: str, obj: Any, where: str, kind: type | tuple, check=None, why: str = "") -> Any:
    """``obj[last part of where]``, of type ``kind`` and passing ``check``; otherwise a CacheError naming it."""
    key = where.rpartition(".")[2]
    if not isinstance(obj, dict) or key not in obj:
        _fail(uri, where, "is missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        _fail(
            uri,
            where,
            f"must be {'/'.join(k.__name__ for k in kinds)}, found {type(value).__name__} {value!r}",
        )
    if check is not None and not check(value):
        _fail(uri, where, f"is {value!r}: {why}")
    return value


_HEX = (lambda v: bool(_HEX64.match(v)), "expected 64 hex digits")
_POSITIVE = (lambda v: v > 0, "must be > 0")
_COUNT = (lambda v: v >= 0, "must be >= 0")


def _layers(uri: str, settings: dict) -> tuple:
    """``settings.layers``: v1 writes ``["final"]`` (kept as written), v2 a list of distinct ints, -1 first."""
    layers = settings.get("layers", ["final"])
    if layers == ["final"]:
        return ("final",)
    ok = (
        isinstance(layers, list)
        and layers[:1] == [-1]
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layers[1:])
        and len(set(layers)) == len(layers)
    )
    if not ok:
        _fail(
            uri, "settings.layers", f"is {layers!r}: expected [-1, n, ...] with distinct layer indices n >= 0"
        )
    return tuple(layers)


def parse_manifest(raw: Any, uri: str) -> Manifest:
    """Validate ``raw`` (the parsed JSON) and return its typed form; one :class:`CacheError` naming the field.

    Also the manifest's internal consistency: shard names are plain names inside ``shards/`` (no ``..``, no
    absolute path), unique, and their rows add up to ``stats.rows``; file names are plain relative names.
    Fields a reader does not use (``stats.tokens``, ``created``, ...) default when absent.
    """
    if not isinstance(raw, dict):
        raise CacheError(f"{uri}: {MANIFEST} must be a JSON object, found {type(raw).__name__}")
    _need(uri, raw, "format", str)
    _need(uri, raw, "schema_version", int)
    _need(uri, raw, "job_fingerprint", str, *_HEX)
    teacher = _need(uri, raw, "teacher", dict)
    _need(uri, teacher, "teacher.name", str)
    _need(uri, teacher, "teacher.hidden_size", int, *_POSITIVE)
    _need(uri, teacher, "teacher.head_rows", int, *_POSITIVE)
    tok = _need(uri, raw, "tokenizer", dict)
    _need(uri, tok, "tokenizer.sha256", str, *_HEX)
    _need(uri, tok, "tokenizer.eos_id", int, *_COUNT)
    s = _need(uri, raw, "settings", dict)
    max_len = _need(uri, s, "settings.max_length", int, lambda v: v > 1, "must be > 1")
    settings = Settings(
        max_length=max_len,
        max_prompt_length=_need(
            uri, s, "settings.max_prompt_length", int, lambda v: 0 < v < max_len, "must be in (0, max_length)"
        ),
        top_k=_need(uri, s, "settings.top_k", int, *_POSITIVE),
        hidden_dtype=_need(
            uri, s, "settings.hidden_dtype", str, lambda v: v in HIDDEN_DTYPES, f"not one of {HIDDEN_DTYPES}"
        ),
        rows_per_shard=int(s.get("rows_per_shard", 0)),
        layers=_layers(uri, s),
        salience=_need(uri, s, "settings.salience", bool) if "salience" in s else False,
    )
    st = _need(uri, raw, "stats", dict)
    rows = _need(uri, st, "stats.rows", int, *_COUNT)
    shard_list = _need(uri, raw, "shards", list, lambda v: len(v) > 0, "must list at least one shard")
    shards, seen = [], set()
    for i, entry in enumerate(shard_list):
        where = f"shards[{i}]"
        name = _need(
            uri,
            entry,
            f"{where}.file",
            str,
            lambda v: bool(_SHARD_FILE.match(v)),
            "not shards/part-NNNNN.arrow",
        )
        if name in seen:
            _fail(uri, f"{where}.file", f"repeats {name}")
        seen.add(name)
        shards.append(
            ShardEntry(
                file=name,
                rows=_need(uri, entry, f"{where}.rows", int, *_COUNT),
                tokens=int(entry.get("tokens", 0)),
                positions=int(entry.get("positions", 0)),
                bytes=_need(uri, entry, f"{where}.bytes", int, *_POSITIVE),
                sha256=_need(uri, entry, f"{where}.sha256", str, *_HEX),
            )
        )
    total = sum(e.rows for e in shards)
    if total != rows:
        _fail(uri, "stats.rows", f"is {rows} but the shards hold {total} rows")
    files = {}
    for name, info in _need(uri, raw, "files", dict).items():
        if not _PLAIN_FILE.match(name) or ".." in name.split("/"):
            _fail(uri, f"files[{name!r}]", "must be a plain relative name inside the cache")
        files[name] = FileEntry(
            bytes=_need(uri, info, f"files[{name!r}].bytes", int, *_COUNT),
            sha256=_need(uri, info, f"files[{name!r}].sha256", str, *_HEX),
        )
    known = {f for f in Manifest.__dataclass_fields__ if f != "extra"}
    return Manifest(
        format=raw["format"],
        schema_version=raw["schema_version"],
        created=str(raw.get("created", "")),
        job_fingerprint=raw["job_fingerprint"],
        teacher=teacher,
        tokenizer=tok,
        source=dict(raw.get("source", {})),
        settings=settings,
        stats=Stats(rows=rows, **{k: st.get(k, 0) for k in Stats.__dataclass_fields__ if k != "rows"}),
        shards=tuple(shards),
        files=files,
        extra={k: v for k, v in raw.items() if k not in known},
    )


# --------------------------------------------------------------------------- assembly (the cache job)
def build_manifest(
    *,
    fingerprint: str,
    settings: Settings,
    teacher_info: dict,
    tokenizer: dict,
    source: dict,
    shard_entries: list[dict],
    files: dict[str, dict],
    seconds: float,
) -> Manifest:
    """The manifest of a finished job from its shard entries (writer sidecars) and the teacher's facts."""
    teacher_info = dict(teacher_info)
    teacher_info.pop("files", None)
    teacher_info.pop("head_check_max_abs_err", None)
    shards = tuple(ShardEntry(**{k: e[k] for k in ShardEntry.__dataclass_fields__}) for e in shard_entries)
    total_bytes = sum(e.bytes for e in shards)
    positions = sum(e.positions for e in shards)
    stored = len(settings.layers)  # the final state and each intermediate layer
    hidden_bytes = stored * teacher_info["hidden_size"] * BYTES_PER_VALUE[settings.hidden_dtype]
    return Manifest(
        format=FORMAT_NAME,
        schema_version=schema_version(
            tuple(n for n in settings.layers if n not in (-1, "final")), settings.salience
        ),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        job_fingerprint=fingerprint,
        teacher=teacher_info,
        tokenizer=tokenizer,
        source=source,
        settings=settings,
        stats=Stats(
            rows=sum(e.rows for e in shards),
            tokens=sum(e.tokens for e in shards),
            positions=positions,
            truncated_prompt=sum(e["truncated_prompt"] for e in shard_entries),
            truncated_total=sum(e["truncated_total"] for e in shard_entries),
            bytes=total_bytes,
            bytes_per_position=total_bytes / max(1, positions),
            hidden_bytes_per_position=hidden_bytes + (4 * stored if settings.hidden_dtype == "int8" else 0),
            dense_fp16_logits_bytes_per_position=2 * teacher_info["head_rows"],
            job_seconds=round(seconds, 2),
        ),
        shards=shards,
        files={k: FileEntry(**v) for k, v in files.items()},
    )
