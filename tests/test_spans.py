"""Word and phrase spans: the rule chunker, its fallback, and the mapping onto real tokenizations."""

from __future__ import annotations

import numpy as np
import pytest

from student_train.spans import chunk_text, shared_span_ids, token_span_ids

TEXT = "The old house was built in 1900, and it has been rebuilt. I don't know why!\n- fast red cars"


def _strings(text, spans):
    return [text[a:b] for a, b in spans]


def test_words_and_phrases_of_english():
    s = chunk_text(TEXT)
    assert not s.fallback
    assert _strings(TEXT, s.words)[:8] == ["The", "old", "house", "was", "built", "in", "1900", "and"]
    assert "don't" in _strings(TEXT, s.words)
    assert _strings(TEXT, s.phrases) == [
        "The old house", "was built", "1900", "it", "has been rebuilt", "I", "don't know", "fast red cars",
    ]  # fmt: skip
    # phrases are made of whole words, in text order, without overlap
    starts, ends = s.phrases[:, 0], s.phrases[:, 1]
    assert (starts[1:] >= ends[:-1]).all()
    assert set(starts) <= set(s.words[:, 0]) and set(ends) <= set(s.words[:, 1])


def test_punctuation_and_line_breaks_cut_phrases():
    text = "red apples\ngreen pears, yellow bananas"
    assert _strings(text, chunk_text(text).phrases) == ["red apples", "green pears", "yellow bananas"]


@pytest.mark.parametrize(
    "text",
    ["北京是中国的首都。", "Москва — столица России", "東京タワーは高い", "مرحبا بالعالم"],
)
def test_non_latin_text_falls_back_to_words(text):
    s = chunk_text(text)
    assert s.fallback
    np.testing.assert_array_equal(s.phrases, s.words)
    assert len(s.words) > 0
    if "北" in text:  # Han characters are words on their own
        assert _strings(text, s.words)[:3] == ["北", "京", "是"]


def test_other_script_inside_latin_text_is_its_own_phrase():
    text = "The capital 北京 is large"
    s = chunk_text(text)
    assert not s.fallback
    assert _strings(text, s.phrases) == ["The capital", "北", "京", "is large"]


def test_empty_and_punctuation_only_texts():
    for text in ("", "   ", "?!..."):
        s = chunk_text(text)
        assert s.words.shape == (0, 2) and s.phrases.shape == (0, 2)


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("which", ["gpt2_tokenizer", "mistral_tokenizer"])
def test_tokens_map_to_the_span_of_their_first_character(which, request):
    tok = request.getfixturevalue(which)
    text = TEXT + "\n北京是中国的首都 café"
    s = chunk_text(text)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = token_span_ids(text, np.asarray(enc["offset_mapping"]), s.phrases)
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    by_span = {}
    for t, k in zip(toks, ids):
        by_span.setdefault(int(k), []).append(t)
    phrases = _strings(text, s.phrases)
    # every phrase is reached by at least one token, and its tokens spell it (markers and spaces aside)
    assert set(by_span) - {-1} == set(range(len(phrases)))
    spelled = [
        tok.convert_tokens_to_string(by_span[k]).strip() for k in range(len(phrases)) if phrases[k].isascii()
    ]
    assert spelled == [p for p in phrases if p.isascii()]
    # punctuation and line breaks belong to no span; Han characters split over byte-level tokens still map
    none = tok.convert_tokens_to_string(by_span[-1])
    assert "".join(none.split()) == "in,and.why!-"
    han = [k for k, p in enumerate(phrases) if p == "北"][0]
    assert len(by_span[han]) >= 1


def test_token_span_ids_ignores_leading_spaces_and_empty_tokens():
    text = "hello big world"
    spans = np.array([[0, 5], [6, 15]])
    offsets = np.array([[0, 5], [5, 9], [9, 15], [15, 15], [0, 0]])  # " big" carries its space; EOS; BOS
    np.testing.assert_array_equal(token_span_ids(text, offsets, spans), [0, 1, 1, -1, -1])


def test_shared_span_ids_keep_spans_both_sides_reach():
    s_ids = np.array([0, 0, 1, -1, 2, 3])
    t_ids = np.array([0, 1, 1, 3, 3, 2])
    s_new, t_new, k = shared_span_ids(s_ids, t_ids, s_limit=5, t_limit=5)
    # span 2 has no teacher token below t_limit; span 3 has no student token below s_limit
    assert k == 2
    np.testing.assert_array_equal(s_new, [0, 0, 1, -1, -1, -1])
    np.testing.assert_array_equal(t_new, [0, 1, 1, -1, -1, -1])
    s_new, t_new, k = shared_span_ids(s_ids, t_ids, 6, 6, keep=np.array([True, False, True, True]))
    assert k == 3
    np.testing.assert_array_equal(s_new, [0, 0, -1, -1, 1, 2])


def test_a_side_cut_short_never_pairs_a_whole_span_with_part_of_it():
    from student_train.spans import sample_spans

    text = "The old house was built"
    full = np.array([[0, 3], [3, 7], [7, 13], [13, 17], [17, 23]])
    # the teacher splits "house" in two and its token limit keeps only "ho": "The old house" is cut on its side
    teacher = np.array([[0, 3], [3, 7], [7, 10], [10, 13], [13, 17], [17, 23]])
    got = sample_spans(text, full, 5, teacher, 3)
    # phrase 0 ("The old house") is covered by the student only; no other phrase reaches the teacher's tokens
    assert (got.phrase_student == -1).all() and (got.phrase_teacher == -1).all()
    np.testing.assert_array_equal(got.word_student, [0, 1, -1, -1, -1])  # "The", "old": both sides whole
    both = sample_spans(text, full, 5, teacher, 6)
    np.testing.assert_array_equal(both.phrase_student, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(both.phrase_teacher, [0, 0, 0, 0, 1, 1])


@pytest.mark.needs_shared_data
def test_response_chunks_pair_the_same_characters_on_real_tokenizers(gpt2_tokenizer, mistral_tokenizer):
    from student_train.spans import response_chunks

    prompt, response = "Question: why?\nAnswer:", " Air molecules scatter short wavelengths, 北京 too."
    text = prompt + response

    def enc(tok):
        e = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        off = np.asarray(e["offset_mapping"])
        start = int(np.searchsorted(off[:, 0], len(prompt)))
        return off, start

    (s_off, s_start), (t_off, t_start) = enc(gpt2_tokenizer), enc(mistral_tokenizer)
    s_ids, t_ids = response_chunks(text, s_off, s_start, len(s_off), t_off, t_start, len(t_off))
    k = int(s_ids.max()) + 1
    assert k >= 5 and int(t_ids.max()) + 1 == k
    for c in range(k):  # a chunk covers the same characters on both sides (leading spaces aside)
        a = text[s_off[s_ids == c][:, 0].min() : s_off[s_ids == c][:, 1].max()].strip()
        b = text[t_off[t_ids == c][:, 0].min() : t_off[t_ids == c][:, 1].max()].strip()
        assert a == b and a
    assert (s_ids[:s_start] == -1).all() and (t_ids[:t_start] == -1).all()  # the response only
    # the teacher cut after 5 response tokens: no chunk beyond what it covers, none half-covered
    s_cut, t_cut = response_chunks(text, s_off, s_start, len(s_off), t_off, t_start, t_start + 5)
    end = t_off[t_start + 4, 1]
    assert all(s_off[s_cut == c][:, 1].max() <= end for c in range(int(s_cut.max()) + 1))
