"""Tokenisation with offsets (METHOD.md §1) on real tokenizers: BOS-free, EOS appended, offsets into the text."""

from __future__ import annotations

import pytest

from pipeline.tokenize import TokenizerError, eos_id_of, tokenize_pair

TEXTS = [
    ("### Instruction:\nSay hi in Japanese 🙂\n\n### Response:\n", "こんにちは! café naïve — 東京"),
    ("Explain:\n", " leading space and\ttabs\n\nnewlines"),
]


@pytest.mark.parametrize("which", ["gpt2_tokenizer", "mistral_tokenizer"])
def test_offsets_cover_the_text_and_eos_is_last(which, request):
    tok = request.getfixturevalue(which)
    eos = eos_id_of(tok)
    for prompt, response in TEXTS:
        t = tokenize_pair(tok, prompt, response, max_prompt_length=256, max_length=512, eos_id=eos)
        text = prompt + response
        assert t.input_ids[-1] == eos and tuple(t.offsets[-1]) == (len(text), len(text))
        if tok.bos_token_id is not None and tok.bos_token_id != eos:
            assert t.input_ids[0] != tok.bos_token_id
        # prompt tokens lie inside the prompt, response tokens inside the response
        assert (t.offsets[: t.response_start, 1] <= len(prompt)).all()
        assert (t.offsets[t.response_start : -1, 0] >= len(prompt)).all()
        assert (t.offsets[:, 0] <= t.offsets[:, 1]).all() and (t.offsets[:, 1] <= len(text)).all()
        # offsets are monotone and the decoded response equals the response text
        assert (t.offsets[1:, 0] >= t.offsets[:-1, 0]).all()
        decoded = tok.decode(t.input_ids[t.response_start : -1].tolist())
        assert decoded.strip() == response.strip()


def test_truncation_follows_method(gpt2_tokenizer):
    tok = gpt2_tokenizer
    prompt = "word " * 50
    response = "answer " * 50
    t = tokenize_pair(tok, prompt, response, max_prompt_length=10, max_length=30, eos_id=eos_id_of(tok))
    assert t.response_start == 10 and len(t.input_ids) == 30
    assert t.truncated_prompt and t.truncated_total
    assert t.input_ids[-1] != eos_id_of(tok)  # EOS was cut with the tail, as in DSKD
    with pytest.raises(TokenizerError, match="must be < max_length"):
        tokenize_pair(tok, "a", "b", max_prompt_length=30, max_length=30, eos_id=0)


def test_eos_override(gpt2_tokenizer):
    assert eos_id_of(gpt2_tokenizer, gpt2_tokenizer.eos_token) == gpt2_tokenizer.eos_token_id
