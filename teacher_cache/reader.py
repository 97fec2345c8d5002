"""Opening, validating and reading a teacher cache (no Ray, no teacher model)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from teacher_cache import storage
from teacher_cache.format import (
    EMBED_FILE,
    FORMAT_NAME,
    HEAD_FILE,
    MANIFEST,
    READABLE_VERSIONS,
    SHARD_DIR,
    TOKENIZER_DIR,
    CachedRow,
    decode_row,
)
from teacher_cache.format import schema as shard_schema
from teacher_cache.manifest import CacheError, Manifest, ShardEntry, parse_manifest

__all__ = ["CacheError", "CacheExpectation", "TeacherCache", "open_cache"]


@dataclass
class CacheExpectation:
    """What the caller requires of a cache; ``None`` fields are not checked.

    Attributes:
        teacher_name: the teacher path/id the cache must come from (``manifest.teacher.name``).
        teacher_weights: the teacher weights fingerprint (``manifest.teacher.weights_fingerprint``).
        tokenizer_sha256: the teacher tokenizer fingerprint (``manifest.tokenizer.sha256``).
        hidden_size: teacher hidden width.
        schema_version: a required version; ``None`` accepts every version this code reads.
    """

    teacher_name: str | None = None
    teacher_weights: str | None = None
    tokenizer_sha256: str | None = None
    hidden_size: int | None = None
    schema_version: int | None = None
    layers: tuple[int, ...] = ()  # intermediate teacher layers the caller needs (v2)
    salience: bool = False  # the attention salience columns (v2, cache.salience=true)


def _check(manifest: Manifest, expect: CacheExpectation, uri: str) -> None:
    found_version = manifest.schema_version
    if manifest.format != FORMAT_NAME:
        raise CacheError(f"{uri}: manifest format is {manifest.format!r}, expected {FORMAT_NAME!r}")
    readable = READABLE_VERSIONS if expect.schema_version is None else (expect.schema_version,)
    if found_version not in readable:
        raise CacheError(
            f"{uri}: cache schema version {found_version} but this code reads version(s) {list(readable)}; "
            "rebuild the cache with this version of teacher_cache.job or use a matching release"
        )
    checks = [
        ("teacher", manifest.teacher.get("name"), expect.teacher_name, "teacher.path"),
        ("teacher weights", manifest.teacher.get("weights_fingerprint"), expect.teacher_weights, "teacher"),
        ("teacher tokenizer", manifest.tokenizer.get("sha256"), expect.tokenizer_sha256, "teacher tokenizer"),
        ("teacher hidden size", manifest.teacher.get("hidden_size"), expect.hidden_size, "teacher"),
    ]
    missing = [n for n in expect.layers if n not in manifest.layout.layers]
    if missing:
        raise CacheError(
            f"{uri}: the objective needs teacher layer(s) {missing}, but this cache holds the final state (-1)"
            f"{' and layers ' + str(list(manifest.layout.layers)) if manifest.layout.layers else ' only'}; "
            "rebuild the cache with cache.layers=[...] listing them, or choose layers it has"
        )
    if expect.salience and not manifest.layout.salience:
        raise CacheError(
            f"{uri}: the objective needs the teacher's attention salience (SRA), which this cache does not hold; "
            "rebuild it with cache.salience=true"
        )
    for what, found, expected, knob in checks:
        if expected is not None and found != expected:
            raise CacheError(
                f"{uri}: cache was built for {what} {found!r}, but the config expects {expected!r}. "
                f"Point the run at a cache built from the same {knob}, or rebuild the cache with "
                "`python -m teacher_cache.job`."
            )


class TeacherCache:
    """A validated, opened cache: manifest facts, shard access, head and embeddings.

    Shards are memory-mapped when the cache is local and read through the filesystem otherwise.
    """

    def __init__(self, uri: str, manifest: Manifest):
        self.uri = uri
        self.manifest = manifest
        self.fs, self.root, self.local = storage.resolve(uri)
        self.layout = manifest.layout
        self.shards: tuple[ShardEntry, ...] = manifest.shards

    # ----------------------------------------------------------------- facts
    @property
    def num_rows(self) -> int:
        return self.manifest.stats.rows

    @property
    def eos_id(self) -> int:
        return self.manifest.eos_id

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden_size

    @property
    def top_k(self) -> int:
        return self.layout.top_k

    @property
    def hidden_dtype(self) -> str:
        return self.layout.hidden_dtype

    @property
    def shard_rows(self) -> list[int]:
        """Rows of each shard, in manifest order."""
        return [e.rows for e in self.shards]

    def __len__(self) -> int:
        return self.num_rows

    # ----------------------------------------------------------------- shards
    def shard_indices_for(self, rank: int, world_size: int) -> list[int]:
        """Shards of one consumer: positions ``rank, rank + world_size, ...`` (no overlap, no gap)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        return list(range(rank, len(self.shards), world_size))

    def _check_entry(self, entry: ShardEntry) -> str:
        """Existence and size of one shard against the manifest (no read); returns its path."""
        path = storage.join(self.root, entry.file)
        if not storage.exists(self.fs, path):
            raise CacheError(
                f"{self.uri}: shard {entry.file} listed in the manifest is missing; re-run the cache job to rebuild it"
            )
        found = storage.size(self.fs, path)
        if found != entry.bytes:
            raise CacheError(
                f"{self.uri}: shard {entry.file} has {found} bytes, the manifest says {entry.bytes}: "
                "the file is truncated or was replaced; re-run the cache job to rebuild it"
            )
        return path

    def open_shard(self, position: int) -> pa.Table:
        """Open shard number ``position`` (manifest order) as a zero-copy Arrow table."""
        entry = self.shards[position]
        path = self._check_entry(entry)
        try:
            src = pa.memory_map(path, "r") if self.local else self.fs.open_input_file(path)
            table = ipc.open_file(src).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheError(
                f"{self.uri}: shard {entry.file} is not a readable Arrow IPC file ({e}); re-run the cache job "
                "to rebuild it"
            ) from e
        if table.num_rows != entry.rows:
            raise CacheError(
                f"{self.uri}: shard {entry.file} has {table.num_rows} rows, manifest says {entry.rows}"
            )
        want = shard_schema(self.layout)
        if not table.schema.equals(want, check_metadata=False):
            got = {f.name: str(f.type) for f in table.schema}
            diff = {f.name: (got.get(f.name), str(f.type)) for f in want if got.get(f.name) != str(f.type)}
            raise CacheError(
                f"{self.uri}: shard {entry.file} does not have the schema the manifest describes "
                f"(hidden_size {self.hidden_size}, top_k {self.top_k}, hidden_dtype {self.hidden_dtype}); "
                f"column (found, expected): {diff}"
            )
        return table

    def iter_shard(self, position: int) -> Iterator[CachedRow]:
        table = self.open_shard(position)
        for batch in table.to_batches():
            for i in range(batch.num_rows):
                yield decode_row(batch, i, self.layout)

    def iter_rows(self, shards: list[int] | None = None) -> Iterator[CachedRow]:
        """Iterate decoded rows of the given shard positions (all by default), in order."""
        for s in shards if shards is not None else range(len(self.shards)):
            yield from self.iter_shard(s)

    def check_files(self) -> None:
        """Cheap completeness check (no reads): every shard and tensor file exists with its manifest size,
        and the shard folder holds exactly the manifest's shards (an extra one means a dropped entry)."""
        for entry in self.shards:
            self._check_entry(entry)
        listed = {e.file.rsplit("/", 1)[1] for e in self.shards}
        shard_dir = storage.join(self.root, SHARD_DIR)
        on_disk = {n for n in storage.list_names(self.fs, shard_dir) if n.endswith(".arrow")}
        extra = sorted(on_disk - listed)
        if extra:
            raise CacheError(
                f"{self.uri}: shard file(s) {extra} are on disk but not in the manifest: rows would be silently "
                "dropped; the manifest was edited or belongs to another cache"
            )
        for name in self.manifest.files:
            if not storage.exists(self.fs, storage.join(self.root, name)):
                raise CacheError(f"{self.uri}: {name} is missing; re-run the cache job to rebuild it")

    def verify(self, shards: list[int] | None = None) -> None:
        """Recompute the sha256 of the given shard positions (all by default) and of the tensor files."""
        for entry in [self.shards[i] for i in shards] if shards is not None else self.shards:
            path = storage.join(self.root, entry.file)
            if not storage.exists(self.fs, path):
                raise CacheError(f"{self.uri}: shard {entry.file} is missing")
            digest = storage.sha256_file(self.fs, path)
            if digest != entry.sha256:
                raise CacheError(
                    f"{self.uri}: shard {entry.file} checksum {digest[:12]}… does not match the manifest's "
                    f"{entry.sha256[:12]}…: the file is corrupt; delete it and re-run the cache job"
                )
        for name, info in self.manifest.files.items():
            digest = storage.sha256_file(self.fs, storage.join(self.root, name))
            if digest != info.sha256:
                raise CacheError(
                    f"{self.uri}: {name} checksum does not match the manifest: the file is corrupt"
                )

    # ----------------------------------------------------------------- tensors
    def _load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        path = storage.join(self.root, name)
        if not storage.exists(self.fs, path):
            raise CacheError(f"{self.uri}: {name} is missing")
        return st_load(storage.read_bytes(self.fs, path))

    def load_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher LM head ``[V_T, d_T]`` and its bias ``[V_T]`` (or None)."""
        t = self._load_tensors(HEAD_FILE)
        return t["weight"], t.get("bias")

    def load_embeddings(self) -> torch.Tensor:
        """Teacher input-embedding table ``[V_T, d_T]`` (a teacher with tied embeddings has it stored once, as
        the head's weight; caches written before that keep a copy in their embeddings file)."""
        if EMBED_FILE not in self.manifest.files and self.manifest.teacher.get("tied_embeddings"):
            return self.load_head()[0]
        return self._load_tensors(EMBED_FILE)["weight"]

    def load_teacher_tokenizer(self, override: str | None = None):
        """The teacher's tokenizer, checked against the manifest's fingerprint.

        From the cache's ``teacher_tokenizer/`` (written since this release) or, for an older cache, from
        ``override`` (a tokenizer directory or ``model:NAME``); either way a tokenizer whose fingerprint
        differs from the one the cache was built with is refused.
        """
        import tempfile

        from transformers import AutoTokenizer

        from pipeline.tokenize import tokenizer_fingerprint

        names = [n for n in self.manifest.files if n.startswith(TOKENIZER_DIR + "/")]
        if override:
            from pipeline.models import resolve

            source = f"tokenizer {override}"
            tok = AutoTokenizer.from_pretrained(resolve(override))
        elif names:
            source = f"{self.uri}/{TOKENIZER_DIR}"
            with tempfile.TemporaryDirectory() as tmp:
                for name in names:
                    target = f"{tmp}/{name.split('/', 1)[1]}"
                    with open(target, "wb") as fh:
                        fh.write(storage.read_bytes(self.fs, storage.join(self.root, name)))
                tok = AutoTokenizer.from_pretrained(tmp)
        else:
            raise CacheError(
                f"{self.uri} has no {TOKENIZER_DIR}/ (built before it was stored): pass the teacher's tokenizer "
                "(data.teacher_tokenizer=DIR or model:NAME); it is checked against the cache's fingerprint"
            )
        want = self.manifest.tokenizer["sha256"]
        got = tokenizer_fingerprint(tok, self.eos_id)["sha256"]
        if got != want:
            raise CacheError(
                f"{source} is not the tokenizer this cache was built with (fingerprint {got[:12]}, the cache "
                f"records {want[:12]})"
            )
        return tok


def open_cache(
    uri: str, expect: CacheExpectation | dict[str, Any] | None = None, verify: bool = False
) -> TeacherCache:
    """Open and validate a cache.

    Args:
        uri: local directory or pyarrow filesystem URI.
        expect: what the caller requires (teacher, tokenizer, ...); mismatches raise :class:`CacheError`.
        verify: also recompute every file's sha256 (reads the whole cache).

    Returns:
        The opened :class:`TeacherCache`.
    """
    if isinstance(expect, dict):
        expect = CacheExpectation(**expect)
    expect = expect or CacheExpectation()
    fs, root, _ = storage.resolve(uri)
    mpath = storage.join(root, MANIFEST)
    if not storage.exists(fs, mpath):
        hint = "the cache job has not finished (or was interrupted): re-run it to complete the cache"
        if not storage.exists(fs, root):
            hint = "the directory does not exist"
        raise CacheError(f"{uri}: no {MANIFEST}; {hint}")
    try:
        raw = storage.read_json(fs, mpath)
    except ValueError as e:
        raise CacheError(f"{uri}: {MANIFEST} is not valid JSON ({e})") from e
    manifest = parse_manifest(raw, uri)
    _check(manifest, expect, uri)
    cache = TeacherCache(uri, manifest)
    cache.check_files()
    if verify:
        cache.verify()
    return cache
