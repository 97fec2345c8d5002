"""What a cache and a student run will cost, before anyone spends GPU-hours on them.

    python -m pipeline.plan --pair qwen2.5-7b-instruct__opt-2.7b --records 11400 --mean-tokens 210
    python -m pipeline.plan --teacher path/to/config.json --student gpt2-120m --tokens 1e9 --hidden-dtype int8
    python -m pipeline.plan --teacher qwen1.5-1.8b --student gpt2-120m --data ../shared/data/dskd/dolly/dev.jsonl \\
        --tokenizer <teacher tokenizer dir>          # exact cache bytes: the records tokenised as the job does

Cache bytes. With ``--data`` and ``--tokenizer`` the records are tokenised exactly as the cache job does and
each shard is serialised with zero-filled arrays by the job's own code (``teacher_cache.writer.serialize_shard``):
the shard format is uncompressed Arrow IPC, so its size depends only on row lengths and texts and the prediction
equals the finished cache's ``stats.bytes`` (tested). Without them, shards of the mean length are serialised
and scaled (exact up to Arrow's 8-byte padding per buffer, for texts of ``--chars-per-token`` bytes a token).

Compute and memory are estimates from the model shapes (stated formulas, not measured): the teacher forward is
``2 N`` FLOPs a token plus attention (``2 L ctx d``) and the head statistics; a student step is ``6 N`` a token
plus, for the DSKD family, the rebuilt teacher logits (``4 V_T d_T`` a response position: forward and backward)
and the projected student-space logits (``4 V_S d_S``). Student memory per GPU under ZeRO: bf16 weights and
gradients, fp32 master weights and two Adam moments, partitioned by stage, plus the cached teacher head and
embedding table (fp32, on every rank) and activations without recomputation (Korthikanti et al.:
``34 s b d + 5 a s^2 b`` bytes a layer) and the fp32 logits. Under ZeRO, as DeepSpeed implements it, the fp32
master copy exists in any precision, gradients also live in an fp32 partition, and Adam's update makes one
temporary the size of that partition: 28 bytes a parameter for fp32 on one rank. The DSKD family adds the
projected teacher's student-space logits (four ``b s V_S`` fp32 copies) and the teacher-space KL's vocabulary slabs
(four ``[chunk, V_T]``). Checked against the peak host memory of real student jobs here (tests/test_train.py;
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# public HF config.json facts of the paper's models and of this project's pair: hidden size, blocks, vocabulary,
# MLP width, attention heads, key/value heads, tied embeddings, gated MLP
_SHAPES = {
    "qwen1.5-1.8b": (2048, 24, 151936, 5504, 16, 16, False, True),
    "qwen2.5-7b": (3584, 28, 152064, 18944, 28, 4, False, True),
    "qwen2.5-7b-instruct": (3584, 28, 152064, 18944, 28, 4, False, True),
    "mistral-7b": (4096, 32, 32000, 14336, 32, 8, False, True),
    "qwen2.5-coder-1.5b-instruct": (1536, 28, 151936, 8960, 12, 2, True, True),
    "gpt2-120m": (768, 12, 50257, 3072, 12, 12, True, False),
    "gpt2-340m": (1024, 24, 50257, 4096, 16, 16, True, False),
    "gpt2-1.5b": (1600, 48, 50257, 6400, 25, 25, True, False),
    "tinyllama-1.1b": (2048, 22, 32000, 5632, 32, 4, False, True),
    "opt-2.7b": (2560, 32, 50272, 10240, 32, 32, True, False),
    "smollm2-135m-instruct": (576, 30, 49152, 1536, 9, 3, True, True),
}
# the paper's five pairs (configs/paper/) and the pretrained pair of docs/BENCHMARKS.md
PAIRS = {
    "qwen1.5-1.8b__gpt2-120m": ("qwen1.5-1.8b", "gpt2-120m"),
    "qwen1.5-1.8b__gpt2-340m": ("qwen1.5-1.8b", "gpt2-340m"),
    "qwen2.5-7b__gpt2-1.5b": ("qwen2.5-7b", "gpt2-1.5b"),
    "qwen2.5-7b-instruct__opt-2.7b": ("qwen2.5-7b-instruct", "opt-2.7b"),
    "mistral-7b__tinyllama-1.1b": ("mistral-7b", "tinyllama-1.1b"),
    "qwen2.5-coder-1.5b-instruct__smollm2-135m-instruct": (
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
    ),
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    vocab: int
    ffn: int
    heads: int
    kv_heads: int
    tied: bool
    gated: bool

    @property
    def params(self) -> int:
        """Weights (biases and norms aside): embeddings, head unless tied, attention and MLP of every block."""
        kv = self.hidden // self.heads * self.kv_heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        mlp = (3 if self.gated else 2) * self.hidden * self.ffn
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * (attn + mlp)

    @property
    def compute_params(self) -> int:
        """Weights a token's forward multiplies by (the embedding lookup is free, the head is not)."""
        return self.params - (0 if self.tied else self.vocab * self.hidden)


def shape_of(spec: str) -> Shape:
    """A known model name, or an HF ``config.json`` (or its folder)."""
    if spec in _SHAPES:
        return Shape(spec, *_SHAPES[spec])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"unknown model {spec!r}: give an HF config.json or one of {sorted(_SHAPES)}")
    c = json.loads(path.read_text())
    hidden = c.get("hidden_size") or c.get("n_embd") or c["d_model"]
    heads = c.get("num_attention_heads") or c["n_head"]
    return Shape(
        path.parent.name,
        hidden,
        c.get("num_hidden_layers") or c["n_layer"],
        c["vocab_size"],
        c.get("intermediate_size") or c.get("n_inner") or c.get("ffn_dim") or 4 * hidden,
        heads,
        c.get("num_key_value_heads") or heads,
        bool(c.get("tie_word_embeddings", True)),
        c.get("model_type") in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
    )


def _layout(hidden: int, args):
    from teacher_cache.format import Layout

    layers = tuple(sorted(n for n in args.layers if n != -1))
    return Layout(hidden, args.top_k, args.hidden_dtype, layers, args.salience)


def _zero_row(i: int, prompt: str, response: str, ids, offsets, start: int, layout) -> dict:
    import numpy as np

    from teacher_cache.format import columns

    L, P = len(ids), len(ids) - 1
    row = {
        "sample_id": "0" * 32,
        "source_index": i,
        "prompt": prompt,
        "response": response,
        "input_ids": np.asarray(ids, dtype=np.int32),
        "offsets": np.asarray(offsets, dtype=np.int32).reshape(L, 2),
        "response_start": start,
    }
    for c in columns(layout):
        if c.name not in row and c.per == "position":
            width = c.inner_width(layout)
            row[c.name] = np.zeros((P,) if width is None else (P, width), dtype=c.numpy_dtype(layout))
    return row


def cache_bytes_exact(records, tokenizer, hidden: int, args) -> dict:
    """Shard bytes of the cache the job would write for ``records`` (``pipeline.records.Record``): tokenised
    as the job does, serialised by the job's writer with zero-filled arrays."""
    from pipeline.tokenize import eos_id_of, tokenize_pair
    from teacher_cache.format import build_table
    from teacher_cache.writer import serialize_shard

    layout = _layout(hidden, args)
    eos = eos_id_of(tokenizer, None)
    total = positions = rows = 0
    shard: list[dict] = []

    def flush():
        nonlocal total
        if shard:
            total += serialize_shard(build_table(shard, layout)).size
            shard.clear()

    for i, r in enumerate(records):
        t = tokenize_pair(
            tokenizer,
            r.prompt,
            r.response,
            max_prompt_length=args.max_prompt_length,
            max_length=args.max_length,
            eos_id=eos,
        )
        shard.append(_zero_row(i, r.prompt, r.response, t.input_ids, t.offsets, t.response_start, layout))
        positions += len(t.input_ids) - 1
        rows += 1
        if len(shard) == args.rows_per_shard:
            flush()
    flush()
    return {"bytes": total, "rows": rows, "positions": positions, "exact": True}


def cache_bytes_estimate(rows: int, mean_tokens: float, hidden: int, args) -> dict:
    """Shards of rows of the mean length serialised and scaled (texts of ``chars_per_token`` bytes a token)."""
    from teacher_cache.format import build_table
    from teacher_cache.writer import serialize_shard

    layout = _layout(hidden, args)
    L = max(2, round(mean_tokens))
    text = "x" * round(args.chars_per_token * L)
    half = len(text) // 2
    offsets = [(min(k * args.chars_per_token, len(text)),) * 2 for k in range(L)]
    one = [
        _zero_row(i, text[:half], text[half:], [0] * L, offsets, L // 2, layout)
        for i in range(args.rows_per_shard)
    ]
    full = serialize_shard(build_table(one, layout)).size
    shards, rest = divmod(rows, args.rows_per_shard)
    total = shards * full
    if rest:
        total += serialize_shard(build_table(one[:rest], layout)).size
    return {"bytes": total, "rows": rows, "positions": rows * (L - 1), "exact": False}


def plan(teacher: Shape, student: Shape, cache: dict, args) -> dict:
    """Cache size, precompute cost, student step cost and memory (module docstring for the formulas)."""
    positions, rows = cache["positions"], cache["rows"]
    ctx = positions / max(rows, 1)
    t_fwd = 2 * teacher.compute_params + 2 * teacher.layers * ctx * teacher.hidden + 5 * teacher.vocab
    precompute = t_fwd * positions
    gpu_flops = args.gpu_tflops * 1e12 * args.utilisation
    response = args.response_fraction
    from student_train.losses.config import ObjectiveConfig
    from student_train.losses.divergences import auto_chunk_size

    objective = ObjectiveConfig.preset(args.method)
    s_step_token = 6 * student.compute_params
    # the DSKD family: rebuilt teacher logits (fwd + bwd) and the projected student logits
    if objective.kd_enabled:
        s_step_token += response * (4 * teacher.vocab * teacher.hidden + 4 * student.vocab * student.hidden)
    elif objective.needs_teacher_head:  # logit-level baselines: the teacher's logits, forward only
        s_step_token += response * 2 * teacher.vocab * teacher.hidden
    tokens_per_step = args.micro_batch * ctx
    g = args.gpus
    n = student.params
    trainable = n if not args.lora_r else args.lora_r * 2 * student.hidden * 4 * student.layers
    p = 2 if args.precision == "bf16" else 4  # bytes of a weight, gradient and activation value
    part = g if args.zero >= 1 else 1  # what ZeRO partitions: master weights, moments, fp32 gradients
    weights = p * n / (g if args.zero == 3 else 1)
    # gradients: the parameters' own (reduced bucket by bucket) plus, under ZeRO, their fp32 partition
    grads = p * trainable / (g if args.zero >= 2 else 1) + (4 * trainable / part if args.zero >= 1 else 0)
    # optimizer: AdamW's two fp32 moments, the fp32 master copy that ZeRO (any precision) and mixed precision
    # keep, and the update's temporary over the flat fp32 partition (DeepSpeed steps one flat tensor)
    master = 4 if (args.zero >= 1 or p == 2) else 0
    optim = (8 + master + (4 if args.zero >= 1 else 0)) * trainable / part
    seq = args.max_length  # the peak comes from a micro-batch padded to the longest sequence
    # Korthikanti et al.'s bytes for 16-bit activations, scaled to the precision
    acts = (
        (p / 2)
        * student.layers
        * (34 * seq * args.micro_batch * student.hidden + 5 * student.heads * seq**2 * args.micro_batch)
    )
    logits = 4 * args.micro_batch * seq * student.vocab * 2  # fp32 logits and their gradient
    if objective.kd_enabled:  # the DSKD family's vocabulary work, read off student_train/losses:
        # the projected teacher in the student's space: its logits, their log-softmax and two gradients
        logits += 4 * args.micro_batch * seq * student.vocab * 4
        # the teacher-space KL: at most four [chunk, V_T] fp32 slabs alive in one chunk (divergences.py)
        chunk = objective.teacher_chunk_size or auto_chunk_size(teacher.vocab, teacher.hidden)
        logits += 4 * chunk * teacher.vocab * 4
    teacher_tables = (
        0 if args.method == "sft" else 4 * teacher.vocab * teacher.hidden * (1 if teacher.tied else 2)
    )
    memory = weights + grads + optim + acts + logits + teacher_tables
    head_bytes = 4 * teacher.vocab * teacher.hidden * (1 if teacher.tied else 2)
    return {
        "teacher": asdict(teacher) | {"params": teacher.params},
        "student": asdict(student) | {"params": student.params},
        "cache": cache
        | {"bytes_per_position": cache["bytes"] / max(positions, 1), "head_embedding_bytes": head_bytes},
        "precompute": {
            "flops": precompute,
            "gpu_hours": precompute / gpu_flops / 3600,
            "assumed": f"{args.gpu_tflops:g} TFLOP/s per GPU at {args.utilisation:.0%} utilisation",
        },
        "student_step": {
            "flops_per_token": s_step_token,
            "flops_per_step_per_gpu": s_step_token * tokens_per_step,
            "epoch_gpu_hours": s_step_token * positions / gpu_flops / 3600,
        },
        "student_memory_per_gpu": {
            "weights": weights,
            "gradients": grads,
            "optimizer": optim,
            "activations": acts,
            "logits": logits,
            "teacher_head_and_embeddings": teacher_tables,
            "total": memory,
        },
    }


def _human(x: float, unit: str = "B") -> str:
    for scale, name in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {name}{unit}"
    return f"{x:.0f} {unit}"


def table(p: dict) -> str:
    c, pre, st, mem = p["cache"], p["precompute"], p["student_step"], p["student_memory_per_gpu"]
    lines = [
        f"teacher {p['teacher']['name']} ({_human(p['teacher']['params'], '')} params), "
        f"student {p['student']['name']} ({_human(p['student']['params'], '')} params)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| cache rows / positions | {c['rows']:,} / {c['positions']:,} |",
        f"| cache shards | {_human(c['bytes'])} ({c['bytes_per_position']:.0f} B/position; "
        f"{'exact' if c['exact'] else 'estimate'}) |",
        f"| teacher head + embeddings (once) | {_human(c['head_embedding_bytes'])} |",
        f"| precompute | {_human(pre['flops'], 'FLOP')}, {pre['gpu_hours']:.2f} GPU-hours ({pre['assumed']}) |",
        f"| student step | {_human(st['flops_per_token'], 'FLOP')} a token, {_human(st['flops_per_step_per_gpu'], 'FLOP')} "
        f"a micro-batch; {st['epoch_gpu_hours']:.2f} GPU-hours an epoch |",
        *(f"| student memory per GPU: {k.replace('_', ' ')} | {_human(v)} |" for k, v in mem.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--pair", choices=sorted(PAIRS), help="a known teacher/student pair")
    ap.add_argument("--teacher", help="model name or HF config.json")
    ap.add_argument("--student", help="model name or HF config.json")
    ap.add_argument("--data", help="records to measure (with --tokenizer: exact cache bytes)")
    ap.add_argument("--tokenizer", help="the teacher's tokenizer (folder) for --data")
    ap.add_argument("--records", type=int, help="records (without --data)")
    ap.add_argument("--mean-tokens", type=float, default=256.0, help="mean teacher tokens a record")
    ap.add_argument("--tokens", type=float, help="corpus size in teacher tokens (instead of --records)")
    ap.add_argument("--chars-per-token", type=int, default=4)
    ap.add_argument("--hidden-dtype", default="bfloat16", choices=sorted(BYTES))
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[-1])
    ap.add_argument("--salience", action="store_true")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--rows-per-shard", type=int, default=128)
    ap.add_argument("--method", default="dwa_kd", help="an objective preset (its terms set the step cost)")
    ap.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp32"), help="train.precision (fp16 costs as bf16)"
    )
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100 SXM)")
    ap.add_argument("--utilisation", type=float, default=0.4)
    ap.add_argument("--response-fraction", type=float, default=0.5, help="share of positions in responses")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    try:
        if args.pair:
            t_name, s_name = PAIRS[args.pair]
        elif args.teacher and args.student:
            t_name, s_name = args.teacher, args.student
        else:
            raise ValueError("give --pair, or --teacher and --student")
        teacher, student = shape_of(t_name), shape_of(s_name)
        if args.data:
            if not args.tokenizer:
                raise ValueError(
                    "--data needs --tokenizer (the teacher's) to tokenise the records as the job does"
                )
            from transformers import AutoTokenizer

            from pipeline.records import DataConfig, read_records

            tok = AutoTokenizer.from_pretrained(args.tokenizer)
            cache = cache_bytes_exact(read_records(DataConfig(path=args.data)), tok, teacher.hidden, args)
        else:
            rows = args.records or (int(args.tokens / args.mean_tokens) if args.tokens else None)
            if not rows:
                raise ValueError("give --data, --records or --tokens")
            cache = cache_bytes_estimate(rows, args.mean_tokens, teacher.hidden, args)
    except (ValueError, OSError) as e:
        ap.exit(2, f"error: {e}\n")
    result = plan(teacher, student, cache, args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
