"""Tiny real things for tests and the offline demo: tokenizers, random-init models, task data.

Everything here is built locally from config objects and in-process tokenizer training; nothing is
downloaded. When ``../shared/data/tokenizers`` exists, tests use the real GPT-2 and Mistral tokenizers;
otherwise :func:`synthetic_tokenizer` trains a small byte-level BPE so the same code paths still run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "or",
    "which",
    "their",
    "river",
    "mountain",
    "city",
    "music",
    "science",
    "history",
    "planet",
    "ocean",
    "forest",
    "language",
    "computer",
    "garden",
    "recipe",
    "bread",
    "coffee",
    "winter",
    "summer",
    "travel",
    "museum",
    "library",
    "train",
    "bridge",
    "energy",
    "water",
    "light",
    "color",
    "number",
    "explain",
    "describe",
    "list",
    "write",
    "summarize",
    "classify",
    "compare",
    "why",
    "how",
    "what",
    "when",
    "where",
    "who",
    "give",
    "name",
    "three",
    "two",
    "five",
    "simple",
    "short",
    "important",
    "famous",
    "ancient",
    "modern",
    "small",
    "large",
    "quickly",
    "carefully",
    "café",
    "naïve",
    "über",
    "東京",
    "München",
    "emoji",
    "🙂",
    "data",
    "model",
    "token",
    "student",
    "teacher",
    "distillation",
]


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 40))) for _ in range(n)]


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Small instruction-following task in the DSKD jsonl layout (prompt with the Alpaca template, output).

    The task is learnable: the response repeats the instruction's words in reverse order, optionally
    prefixed, so a student can visibly improve within minutes on a CPU.
    """
    from pipeline.records import alpaca_prompt

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 9))]
        instruction = "Reverse the words: " + " ".join(words)
        context = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 6))) if rng.random() < 0.4 else ""
        rows.append(
            {"prompt": alpaca_prompt(instruction, context), "output": " ".join(reversed(words)) + "."}
        )
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def synthetic_tokenizer(
    out_dir: str | Path, vocab_size: int = 600, kind: str = "bytelevel", extra_corpus: list[str] | None = None
):
    """Train a tiny tokenizer (``bytelevel`` BPE like GPT-2, or ``metaspace`` BPE like Llama) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    if kind == "bytelevel":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tk = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        specials = ["<unk>", *specials]
        alphabet = sorted(
            {c for t in synthetic_texts(50) for c in t} | set("abcdefghijklmnopqrstuvwxyz#:.,\n")
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    corpus = (
        synthetic_texts(2000)
        + [r["prompt"] + r["output"] for r in synthetic_records(300)]
        + list(extra_corpus or [])
    )
    tk.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>" if kind != "bytelevel" else None,
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return fast


def tiny_causal_lm(
    arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0, dropout: float = 0.0
):
    """A random-init causal LM built from a config object: ``llama``, ``mistral`` or ``gpt2``."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig

    torch.manual_seed(seed)
    decoder = dict(  # the shared shape of the tiny Llama / Mistral decoders
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    if arch == "llama":
        conf = LlamaConfig(**decoder, tie_word_embeddings=False)
    elif arch == "mistral":
        conf = MistralConfig(**decoder, sliding_window=None)
    elif arch == "gpt2":
        conf = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=1024,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama, mistral or gpt2")
    return AutoModelForCausalLM.from_config(conf)


def save_tiny_model(
    out_dir: str | Path,
    arch: str,
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    dropout: float = 0.0,
) -> Path:
    """Build a tiny model whose vocabulary covers ``tokenizer`` and save model + tokenizer to ``out_dir``."""
    out_dir = Path(out_dir)
    model = tiny_causal_lm(arch, len(tokenizer), hidden=hidden, layers=layers, seed=seed, dropout=dropout)
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
