"""Token alignment between two tokenizations of the same text, in one place for every method.

Two alignments, both per sample and both pure functions of token ids, strings and character offsets:

* **Character-offset chunks** (:func:`offset_chunks`): the text is cut only where *both* tokenizations
  have a token boundary; each chunk holds the student and teacher tokens that cover the same characters
  (one-to-one, one-to-many, many-to-one or many-to-many). This is what real tokenizers need: a leading
  space inside ``Ġthe`` / ``▁the``, byte-level tokens that split one multi-byte character (both claim the
  character: their spans overlap, so no cut falls between them), byte-fallback pieces, CJK and emoji, and
  empty-span tokens (an EOS at the end, a BOS at the start) which join the chunk that starts at their
  position (two EOS at the end of the text form the last chunk together).
  :func:`aligned_next_token_positions` turns chunks into a position map: student position ``j`` (which
  predicts token ``j+1``) is paired with teacher position ``i`` when tokens ``j+1`` and ``i+1`` are
  one-to-one in their chunk, i.e. both models predict the same characters from the same prefix.
* **Minimum edit distance** (:func:`edit_distance_alignment`): DTW over the two token-string sequences
  with the Levenshtein distance of the strings after removing each tokenizer's word-boundary marker, as
  MinED (Wan et al. 2024) in songmzhang/DSKD ``criterions/min_edit_dis_kld.py`` does (same recursion, same
  tie-breaking in the backtrace).

:func:`vocab_mapping` is FuseLLM's teacher->student vocabulary map used by MinED (each teacher token to
the student token at the smallest edit distance; exact matches first), computed once per tokenizer pair
and kept on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__)

MARKERS = ("Ġ", "▁")


def space_marker(tokenizer) -> str:
    """The word-boundary marker of a tokenizer's vocabulary: 'Ġ' (byte-level BPE), '▁' (SentencePiece) or ''."""
    counts = dict.fromkeys(MARKERS, 0)
    for tok in tokenizer.get_vocab():
        if tok[:1] in counts:
            counts[tok[:1]] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ""


def check_offsets(offsets: np.ndarray, text_length: int, what: str) -> None:
    """Spans must lie inside the text and not be reversed: anything else means a damaged cache row."""
    off = np.asarray(offsets).reshape(-1, 2)
    if len(off) and (off.min() < 0 or off.max() > text_length or (off[:, 1] < off[:, 0]).any()):
        raise ValueError(
            f"{what} offsets {off.min()}..{off.max()} do not lie inside the text of {text_length} characters "
            "(or a span is reversed): the cache row does not describe this text"
        )


def _cuts(offsets: np.ndarray, length: int) -> np.ndarray:
    """Boolean ``[length + 1]``: character positions no token's span strictly contains."""
    cut = np.ones(length + 1, dtype=bool)
    for a, b in offsets:
        if b - a > 1:
            cut[a + 1 : b] = False
    return cut


def offset_chunks(s_offsets: np.ndarray, t_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chunk index of every student and every teacher token (``[L_s]``, ``[L_t]`` int64).

    A chunk is a run of characters between two consecutive positions where both tokenizations may be cut.
    Tokens with an empty span ``(c, c)`` belong to the chunk that starts at ``c`` (EOS at the end of the
    text: a chunk of their own after the last character). Offsets are ``[L, 2]`` character spans into the
    same string; tokens may overlap (byte-level pieces of one character) but must be in text order.
    """
    s_offsets = np.asarray(s_offsets, dtype=np.int64).reshape(-1, 2)
    t_offsets = np.asarray(t_offsets, dtype=np.int64).reshape(-1, 2)
    for name, off in (("student", s_offsets), ("teacher", t_offsets)):
        if len(off) and ((off[:, 1] < off[:, 0]).any() or (off < 0).any()):
            raise ValueError(
                f"{name} offsets have a negative or reversed span: {off[(off[:, 1] < off[:, 0])][:3]}"
            )
    length = int(max(s_offsets[:, 1].max(initial=0), t_offsets[:, 1].max(initial=0)))
    common = np.flatnonzero(_cuts(s_offsets, length) & _cuts(t_offsets, length))

    def assign(off: np.ndarray) -> np.ndarray:
        # chunk k spans [common[k], common[k+1]); a token starting at a belongs to the chunk containing a
        return np.searchsorted(common, off[:, 0], side="right") - 1

    return assign(s_offsets), assign(t_offsets)


def aligned_next_token_positions(
    s_offsets: np.ndarray, t_offsets: np.ndarray, s_positions: np.ndarray, t_positions: np.ndarray
) -> np.ndarray:
    """For each student position in ``s_positions``, the teacher position predicting the same characters.

    Position ``j`` predicts token ``j + 1``. Student position ``j`` is paired with teacher position ``i``
    (from ``t_positions``) when tokens ``j + 1`` and ``i + 1`` are alone in the same offset chunk (a
    one-to-one chunk); otherwise ``-1``. Returns ``[len(s_positions)]`` int64.
    """
    s_chunk, t_chunk = offset_chunks(s_offsets, t_offsets)
    s_count = np.bincount(s_chunk, minlength=max(s_chunk.max(initial=0), t_chunk.max(initial=0)) + 1)
    t_count = np.bincount(t_chunk, minlength=len(s_count))
    s_count, t_count = (
        np.resize(s_count, max(len(s_count), len(t_count))),
        np.resize(t_count, max(len(s_count), len(t_count))),
    )
    owner = {}
    for i in np.asarray(t_positions, dtype=np.int64):
        c = t_chunk[i + 1]
        if t_count[c] == 1:
            owner[int(c)] = int(i)
    out = np.full(len(s_positions), -1, dtype=np.int64)
    for k, j in enumerate(np.asarray(s_positions, dtype=np.int64)):
        c = int(s_chunk[j + 1])
        if s_count[c] == 1 and c in owner:
            out[k] = owner[c]
    return out


def edit_distance_alignment(
    t_tokens: list[str], s_tokens: list[str], t_marker: str = "Ġ", s_marker: str = "Ġ"
) -> tuple[list[list[int]], float]:
    """MinED's DTW over token strings: for each student token the teacher tokens matched to it, and the cost.

    Cost of a pair: Levenshtein distance after removing the marker of each side (songmzhang/DSKD
    ``min_edit_dis_kld.py``). Recursion ``D[i,j] = c(i,j) + min(D[i-1,j], D[i,j-1], D[i-1,j-1])`` with
    ``D[0,0] = c(0,0)``; backtrace from the last pair choosing diagonal, then up (teacher), then left
    (student) on ties, as the reference does.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    n, m = len(t_tokens), len(s_tokens)
    if n == 0 or m == 0:
        return [[] for _ in range(m)], 0.0
    a = [x.replace(t_marker, "") if t_marker else x for x in t_tokens]
    b = [x.replace(s_marker, "") if s_marker else x for x in s_tokens]
    cost = cdist(a, b, scorer=Levenshtein.distance, dtype=np.float64)
    acc = _dtw_accumulate(cost)
    i, j = n - 1, m - 1
    s_to_t: list[list[int]] = [[] for _ in range(m)]
    while i > 0 or j > 0:
        s_to_t[j].append(i)
        diag = acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = acc[i - 1, j] if i > 0 else np.inf
        left = acc[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    s_to_t[0].append(0)
    for row in s_to_t:
        row.reverse()
    return s_to_t, float(acc[-1, -1])


def _dtw_accumulate(cost: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost (the reference's matrix without its inf border)."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(n):  # row by row: a vectorised min over the previous row, a scan along this one
        diag_up = np.minimum(acc[i, 1:], acc[i, :-1]) + cost[i]
        row = acc[i + 1]
        for j in range(m):
            row[j + 1] = min(diag_up[j], row[j] + cost[i, j])
    return acc[1:, 1:]


def _vocab_strings(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    out = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        out[i] = tok
    return out


def vocab_mapping(teacher_tok, student_tok, cache_dir: str | Path | None = None) -> np.ndarray:
    """``[V_T]`` int64: for every teacher token id, the student token id nearest by edit distance.

    FuseLLM ``vocab_mapping.py`` (default mode), as DSKD's MinED data were made: the teacher's marker is
    replaced by the student's; a string in the student vocabulary maps to itself, any other to the student
    token at the smallest Levenshtein distance (the first in id order on ties). Computed once per pair of
    tokenizers and kept as ``.npy`` under ``cache_dir`` (default ``$XTOKD_CACHE`` or ``~/.cache/xtokd``),
    keyed by both vocabularies' sha256 and checked on load.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    t_marker, s_marker = space_marker(teacher_tok), space_marker(student_tok)
    t_vocab, s_vocab = _vocab_strings(teacher_tok), _vocab_strings(student_tok)
    key = hashlib.sha256(json.dumps([t_vocab, s_vocab, t_marker, s_marker]).encode()).hexdigest()[:24]
    root = Path(cache_dir or os.environ.get("XTOKD_CACHE", Path.home() / ".cache" / "xtokd")) / "vocab_maps"
    path = root / f"{key}.npy"
    if path.exists():
        mapping = np.load(path, allow_pickle=False)
        if mapping.shape == (len(t_vocab),) and mapping.min() >= 0 and mapping.max() < len(s_vocab):
            return mapping
    index = {tok: i for i, tok in enumerate(s_vocab) if tok}
    mapping = np.zeros(len(t_vocab), dtype=np.int64)
    for i, tok in enumerate(t_vocab):
        q = tok.replace(t_marker, s_marker) if t_marker and s_marker else tok
        hit = index.get(q)
        if hit is None:
            hit = process.extractOne(q, s_vocab, scorer=Levenshtein.distance)[2]
        mapping[i] = hit
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, mapping)
    os.replace(tmp, path)
    return mapping


def mined_aligned_positions(
    t_tokens: list[str],
    s_tokens: list[str],
    t_ids: np.ndarray,
    s_ids: np.ndarray,
    tea2stu: np.ndarray,
    t_marker: str,
    s_marker: str,
) -> np.ndarray:
    """MinED's per-student-row teacher row (``[len(s_tokens)]`` int64, ``-1`` = use the one-hot target).

    Row ``j`` is aligned to teacher row ``i`` when the edit-distance DTW matches exactly one teacher token
    to student token ``j`` and the vocabulary map sends that teacher token to the student token itself
    (``tea2stu[t_ids[i]] == s_ids[j]``), as DSKD's ``transform_step_logits_fast`` requires.
    """
    s_to_t, _ = edit_distance_alignment(t_tokens, s_tokens, t_marker, s_marker)
    out = np.full(len(s_tokens), -1, dtype=np.int64)
    for j, match in enumerate(s_to_t):
        if len(match) == 1 and int(tea2stu[int(t_ids[match[0]])]) == int(s_ids[j]):
            out[j] = match[0]
    return out


class MinedVocab:
    """What MinED needs per batch: both vocabularies' strings, their markers and the teacher->student map."""

    def __init__(self, teacher_tok, student_tok, cache_dir: str | Path | None = None):
        self.t_tokens, self.s_tokens = _vocab_strings(teacher_tok), _vocab_strings(student_tok)
        self.t_marker, self.s_marker = space_marker(teacher_tok), space_marker(student_tok)
        self.tea2stu = vocab_mapping(teacher_tok, student_tok, cache_dir)

    def image(self) -> tuple[np.ndarray, np.ndarray]:
        """Student ids the map reaches and, for each, the first (smallest) teacher id mapped to it."""
        first: dict[int, int] = {}
        for t_id, s_id in enumerate(self.tea2stu.tolist()):
            first.setdefault(s_id, t_id)
        return np.fromiter(first.keys(), dtype=np.int64), np.fromiter(first.values(), dtype=np.int64)


class BatchAlignment:
    """Per-sample alignments and cached extras the collate step adds to a batch, as the objective asks.

    ``offsets``: :func:`aligned_next_token_positions`; ``mined``: :func:`mined_aligned_positions` with a
    :class:`MinedVocab`; ``topk``: carry the cached top-k log-probs; ``layers``: carry these cached teacher
    layers (HF indices; the final state is always carried); ``spans``: word and phrase span ids of both
    sides (:mod:`student_train.spans`); ``entropy``: carry the cached teacher entropy; ``salience``: carry
    these layers' cached attention salience (-1 = final); ``chunks``: the response chunks both sides cut at.
    """

    def __init__(
        self,
        offsets: bool = False,
        mined: MinedVocab | None = None,
        topk: bool = False,
        layers: tuple[int, ...] = (),
        spans: bool = False,
        entropy: bool = False,
        salience: tuple[int, ...] = (),
        chunks: bool = False,
    ):
        self.offsets, self.mined, self.topk = offsets, mined, topk
        self.layers, self.spans, self.entropy = tuple(layers), spans, entropy
        self.salience, self.chunks = tuple(salience), chunks

    def sample(
        self,
        s_ids: np.ndarray,
        s_offsets: np.ndarray,
        s_pos: np.ndarray,
        t_ids: np.ndarray,
        t_offsets: np.ndarray,
        t_pos: np.ndarray,
        text_length: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Teacher positions for each student response position ``s_pos`` (``-1`` = none), per kind.

        Offsets must be spans inside the text (``text_length`` characters, when given): anything else
        means the cache and the records disagree, and is an error.
        """
        if text_length is not None:
            check_offsets(s_offsets, text_length, "student")
            check_offsets(t_offsets, text_length, "teacher")
        out = {}
        if self.offsets:
            out["offsets"] = aligned_next_token_positions(s_offsets, t_offsets, s_pos, t_pos)
        if self.mined is not None:
            v = self.mined
            t_in, s_in = np.asarray(t_ids)[t_pos], np.asarray(s_ids)[s_pos]
            idx = mined_aligned_positions(
                [v.t_tokens[i] for i in t_in], [v.s_tokens[i] for i in s_in], t_in, s_in, v.tea2stu,
                v.t_marker, v.s_marker,
            )  # fmt: skip
            out["mined"] = np.where(idx >= 0, t_pos[np.maximum(idx, 0)] if len(t_pos) else -1, -1)
        return out


def batch_alignment(objective, cache, student_tokenizer, teacher_tokenizer: str | None = None):
    """The per-sample alignments ``objective`` asks the collate step for, or None; and MinED's vocabulary
    (which needs the cache's teacher tokenizer, checked against its fingerprint), or None."""
    topk = objective.logit_kd == "uld_topk" or objective.needs_teacher_topk_ids
    spans, sra = objective.span_enabled, objective.sra_enabled
    entropy = objective.needs_teacher_entropy
    if not (
        objective.needs_offsets_pairing or objective.needs_mined_alignment or topk or spans or sra or entropy
    ):
        return None, None
    mined = None
    if objective.needs_mined_alignment:
        mined = MinedVocab(cache.load_teacher_tokenizer(teacher_tokenizer), student_tokenizer)
    alignment = BatchAlignment(
        offsets=objective.needs_offsets_pairing,
        mined=mined,
        topk=topk,
        layers=teacher_layers_needed(objective),
        spans=spans,
        entropy=entropy,
        salience=tuple(dict.fromkeys(objective.sra_teacher_layers)) if sra else (),
        chunks=sra,
    )
    return alignment, mined


def teacher_layers_needed(objective) -> tuple[int, ...]:
    """The intermediate teacher layers (HF indices >= 0) the objective reads from the cache, ascending."""
    wanted = list(objective.span_teacher_layers) if objective.span_enabled else []
    wanted += list(objective.sra_teacher_layers) if objective.sra_enabled else []
    return tuple(sorted({n for n in wanted if n >= 0}))


def shared_vocab(
    teacher_tok, student_tok, student_rows: int | None = None, teacher_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(student ids, teacher ids)`` of the token strings both vocabularies hold, in student id order (SRA's
    ``get_token_mapping``: an exact match of ``get_vocab()`` strings, added tokens included).

    ``student_rows`` / ``teacher_rows``: the rows of each output head. A tokenizer can hold ids its model has
    no logit for (added tokens past the head); those pairs are dropped, and said, since the term compares
    logits. Raises ``ValueError`` when no pair is left."""
    t_vocab = teacher_tok.get_vocab()
    pairs = sorted((i, t_vocab[tok]) for tok, i in student_tok.get_vocab().items() if tok in t_vocab)
    kept = [
        (s, t)
        for s, t in pairs
        if (student_rows is None or 0 <= s < student_rows) and (teacher_rows is None or 0 <= t < teacher_rows)
    ]
    if len(kept) < len(pairs):
        _log.warning(
            "SRA shared vocabulary: %d of %d shared token strings have an id past an output head "
            "(student rows %s, teacher rows %s) and are left out of the logit term",
            len(pairs) - len(kept), len(pairs), student_rows, teacher_rows,
        )  # fmt: skip
    if not kept:
        raise ValueError(
            "the teacher and student vocabularies share no token string that both output heads have a row "
            "for; SRA's logit term needs some"
        )
    s_ids, t_ids = zip(*kept)
    return np.asarray(s_ids, dtype=np.int64), np.asarray(t_ids, dtype=np.int64)
