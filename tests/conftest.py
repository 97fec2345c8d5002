"""Shared fixtures: real tokenizers from ../shared when present (synthetic ones otherwise), tiny teachers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XTOKD_SHARED", REPO.parent / "shared")) / "data"
HAVE_SHARED = (SHARED / "tokenizers" / "gpt2" / "tokenizer.json").exists()

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"needs ../shared/data (not found at {SHARED})")
    for item in items:
        if "needs_shared_data" in item.keywords and not HAVE_SHARED:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not HAVE_SHARED:
        pytest.skip(f"needs ../shared/data (not found at {SHARED})")
    return SHARED


def _tokenizer(name: str, tmp_root: Path, kind: str):
    from transformers import AutoTokenizer

    from pipeline.tiny import synthetic_tokenizer

    if HAVE_SHARED:
        return AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / name))
    return synthetic_tokenizer(tmp_root / f"syn-{kind}", kind=kind)


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    """Real Mistral tokenizer (SentencePiece BPE, byte fallback) or a synthetic metaspace BPE."""
    return _tokenizer("mistral-7b-v0.1", tmp_path_factory.mktemp("tok"), "metaspace")


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """Real GPT-2 tokenizer (byte-level BPE) or a synthetic byte-level BPE."""
    return _tokenizer("gpt2", tmp_path_factory.mktemp("tok"), "bytelevel")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, mistral_tokenizer) -> Path:
    """A random-init Llama-architecture teacher with the Mistral tokenizer, saved as an HF model dir."""
    from pipeline.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", mistral_tokenizer, hidden=64)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A random-init Mistral-architecture teacher with the GPT-2 tokenizer (tied head), saved as an HF model dir."""
    from pipeline.tiny import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny_mistral"), "mistral", gpt2_tokenizer, hidden=48, seed=1
    )


@pytest.fixture(scope="session")
def synthetic_jsonl(tmp_path_factory) -> Path:
    from pipeline.tiny import synthetic_records, write_jsonl

    return write_jsonl(synthetic_records(40, seed=3), tmp_path_factory.mktemp("data") / "train.jsonl")
