"""The paper's teacher/student pairs: configs load, and the architectures (from config objects, no weights)
fit the projectors, LoRA and the derived DeepSpeed batch of the recipe (METHOD.md §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from student_train.config import TrainConfig
from teacher_cache.job import CacheJobConfig

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"


def _arch(name: str):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    return {
        "qwen1.5-1.8b": Qwen2Config(
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            intermediate_size=5504,
            vocab_size=151936,
        ),
        "qwen2.5-7b": Qwen2Config(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
        ),
        "qwen2.5-7b-instruct": Qwen2Config(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
        ),
        "mistral-7b": MistralConfig(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=32000,
        ),
        "gpt2-120m": GPT2Config(n_embd=768, n_layer=12, n_head=12),
        "gpt2-340m": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
        "gpt2-1.5b": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
        "tinyllama-1.1b": LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
            vocab_size=32000,
        ),
        "opt-2.7b": OPTConfig(
            hidden_size=2560,
            num_hidden_layers=32,
            num_attention_heads=32,
            ffn_dim=10240,
            vocab_size=50272,
            word_embed_proj_dim=2560,
        ),
    }[name]


@pytest.mark.parametrize("path", sorted(PAPER.glob("train_*.yaml")), ids=lambda p: p.stem)
def test_paper_pair(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from student_train.losses.cma import Projectors

    teacher_name, student_name = path.stem[len("train_") :].split("__")
    cfg = load_config(TrainConfig, path)
    cache_cfg = load_config(CacheJobConfig, PAPER / f"cache_{teacher_name}.yaml")
    assert cfg.data.expect_teacher == cache_cfg.teacher.path
    assert cfg.objective_config().method == "dwa_kd"
    assert cfg.deepspeed_config(world_size=1)["train_batch_size"] == 8  # the paper's effective batch
    assert cfg.optim.projector_lr == 1e-3 and cfg.train.seed == 10 and cfg.student.max_length == 512
    if "qwen" in teacher_name:
        assert cache_cfg.teacher.eos_token == "<|endoftext|>"  # METHOD.md §1: Qwen EOS forced to 151643
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(_arch(teacher_name))
        student = AutoModelForCausalLM.from_config(_arch(student_name))
        d_t = teacher.get_output_embeddings().weight.shape[1]
        d_s = student.get_input_embeddings().weight.shape[1]
        proj = Projectors(d_s, d_t)
        assert proj.query.weight.shape == (2 * d_t, 2 * d_s) and proj.t2s.weight.shape == (d_s, d_t)
        if cfg.lora.enabled:
            assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (256, 8, 0.1)
            peft_model = get_peft_model(
                student,
                LoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules="all-linear",
                ),
            )
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            assert 0 < trainable < sum(p.numel() for p in peft_model.parameters())
        else:
            assert cfg.optim.lr == 5e-4 and cfg.train.epochs == 20
