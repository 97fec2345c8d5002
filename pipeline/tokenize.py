"""Tokenisation of (prompt, response) pairs with character offsets, the same way for every tokenizer.

METHOD.md §1: the prompt and the response are tokenised separately with no special tokens; the prompt
keeps its first ``max_prompt_length`` tokens; the response gets the tokenizer's EOS appended; the whole
sequence keeps its first ``max_length`` tokens. No BOS is added. Offsets are character spans into the
string ``prompt + response`` so that two tokenizers of the same text can be aligned; the EOS token gets
the empty span ``(len(text), len(text))``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
"""Label of positions that are not trained on (prompt and padding), as PyTorch's cross-entropy default."""


class TokenizerError(ValueError):
    """The tokenizer cannot be used as configured (no fast backend, no EOS, ...)."""


@dataclass
class TokenizedPair:
    """A tokenised (prompt, response) pair.

    Attributes:
        input_ids: ``[L]`` int32, prompt tokens then response tokens then EOS (possibly truncated).
        offsets: ``[L, 2]`` int32 character spans into ``prompt + response``.
        response_start: index in ``input_ids`` of the first response token (= number of prompt tokens).
        truncated_prompt: the prompt lost tokens to ``max_prompt_length``.
        truncated_total: the sequence lost tokens to ``max_length``.
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    response_start: int
    truncated_prompt: bool
    truncated_total: bool


def eos_id_of(tokenizer, override: str | None = None) -> int:
    """The EOS id to append (``override`` is a token string, e.g. Qwen's ``<|endoftext|>``)."""
    if override:
        tid = tokenizer.convert_tokens_to_ids(override)
        if tid is None or (tid == tokenizer.unk_token_id and override != tokenizer.unk_token):
            raise TokenizerError(f"eos override {override!r} is not a token of this tokenizer")
        return int(tid)
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no EOS token; set the eos token "
            "explicitly in the config (e.g. teacher.eos_token / student.eos_token)"
        )
    return int(tokenizer.eos_token_id)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not a fast tokenizer: character offsets "
            "need the Rust backend (load it with use_fast=True or convert it with tokenizers)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def tokenize_pair(
    tokenizer,
    prompt: str,
    response: str,
    *,
    max_prompt_length: int,
    max_length: int,
    eos_id: int,
) -> TokenizedPair:
    """Tokenise one pair as METHOD.md §1 (see module doc). Raises if the prompt leaves no room."""
    if max_prompt_length >= max_length:
        raise TokenizerError(
            f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) to leave room for a response"
        )
    p_ids, p_off = _encode(tokenizer, prompt)
    r_ids, r_off = _encode(tokenizer, response)
    truncated_prompt = len(p_ids) > max_prompt_length
    p_ids, p_off = p_ids[:max_prompt_length], p_off[:max_prompt_length]
    shift = len(prompt)
    end = len(prompt) + len(response)
    ids = p_ids + r_ids + [eos_id]
    offs = p_off + [(a + shift, b + shift) for a, b in r_off] + [(end, end)]
    truncated_total = len(ids) > max_length
    ids, offs = ids[:max_length], offs[:max_length]
    return TokenizedPair(
        input_ids=np.asarray(ids, dtype=np.int32),
        offsets=np.asarray(offs, dtype=np.int32).reshape(-1, 2),
        response_start=len(p_ids),
        truncated_prompt=truncated_prompt,
        truncated_total=truncated_total,
    )


def tokenizer_fingerprint(tokenizer, eos_id: int) -> dict:
    """Facts about a tokenizer recorded in (and checked against) the manifest."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError("the teacher tokenizer has no fast backend; character offsets need one")
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "sha256": h.hexdigest(),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_id": tokenizer.bos_token_id,
        "eos_id": eos_id,
        "pad_id": tokenizer.pad_token_id,
        "unk_id": tokenizer.unk_token_id,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }
