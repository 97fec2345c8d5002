"""Train a student from a teacher cache (or plain SFT) under DeepSpeed ZeRO.

    deepspeed --num_gpus N student_train/main.py --config configs/train/<x>.yaml [key=value ...]
    python student_train/main.py --config ... [key=value ...]          # one process

Story: config -> distributed init -> rows (the cache) and tokenizer -> schedule -> student and what the
objective needs from the cache -> optimizer and DeepSpeed engine -> resume -> loop -> checkpoint and export.
The student job never builds the teacher: teacher distributions come from cached hidden states x the cached
head.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch
from tqdm import tqdm

from pipeline.config import config_hash, to_dict
from student_train.align import batch_alignment
from student_train.cli import banner, parse
from student_train.data import Schedule, ScheduledBatches, collate_kwargs, open_rows
from student_train.model import build_distiller, export_trained, load_student, load_student_tokenizer
from student_train.prefit import prefit_projectors
from student_train.trainer import (
    Cursor,
    MetricsLog,
    Trainer,
    flat_config,
    init_distributed,
    load_checkpoint,
    make_optimizer,
    objective_record,
    resume_safe,
    save_checkpoint,
)


def main(argv=None) -> int:
    cfg, args = parse(argv)
    import deepspeed  # after parsing: --help and --print-config print only their own text

    objective = cfg.objective_config()
    rank, world, _ = init_distributed(cfg.train.collective_timeout_s)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.output.dir)

    # rows: the teacher cache (checked against what the config expects), or plain records for SFT
    source, cache = open_rows(cfg, rank, world)
    tok = load_student_tokenizer(cfg)
    alignment, mined = batch_alignment(objective, cache, tok, cfg.data.teacher_tokenizer)
    collate_kw = collate_kwargs(cfg, tok, with_teacher=objective.needs_teacher, alignment=alignment)
    sched = Schedule(
        source.shard_rows, rank, world, cfg.train.micro_batch, cfg.train.seed, cfg.data.shuffle_buffer
    )
    steps_per_epoch = sched.batches_per_epoch // cfg.train.grad_accum
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs

    # the student and what its objective needs from the cache (head, embeddings): never a teacher model
    rss_before_model = psutil.Process().memory_info().rss  # run_info's memory: what the run adds to this
    student = load_student(cfg)
    distiller = build_distiller(cfg, objective, student, cache, mined)
    ckpt_dir = out / "checkpoints"

    def make_loader(epoch: int, start: int):
        batches = ScheduledBatches(source, sched, epoch, start, collate_kw)
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.data.num_workers)

    fresh = not (cfg.output.resume and (ckpt_dir / "latest").exists())
    if cfg.train.projector_prefit_steps and fresh:  # a resumed run has its projectors in the checkpoint
        fit = prefit_projectors(
            distiller, make_loader(0, 0), cfg.train.projector_prefit_steps, cfg.optim.projector_lr, rank
        )
        if rank == 0:
            print(f"[prefit] {fit}", flush=True)
    opt, lr_sched = make_optimizer(cfg, distiller, total_steps)
    engine, *_ = deepspeed.initialize(
        model=distiller, optimizer=opt, lr_scheduler=lr_sched, config=cfg.deepspeed_config(world)
    )

    # resume: only from a checkpoint of the same config (but for how long to train, logging, saving) and cache
    settings = flat_config(cfg)
    identity = {
        "config_hash": config_hash({k: v for k, v in settings.items() if not resume_safe(k)}),
        "cache_fingerprint": cache.manifest.job_fingerprint if cache else None,
    }
    # the resolved objective, recorded and compared on resume: a default moved by an upgrade is seen
    trained_objective = objective_record(objective)
    cursor = (
        load_checkpoint(engine, ckpt_dir, identity, settings, trained_objective)
        if cfg.output.resume
        else None
    ) or Cursor()
    metrics = MetricsLog(out) if rank == 0 else None
    if rank == 0:  # what this run resolved, for operators and for the next resume
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
        (out / "deepspeed_config.json").write_text(json.dumps(cfg.deepspeed_config(world), indent=2))
        metrics.truncate_after(cursor.step)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        print(
            banner(cfg, objective, world, steps_per_epoch, total_steps, trainable, cache, sched, cursor),
            flush=True,
        )

    def save():
        save_checkpoint(
            engine, ckpt_dir, cursor, {**identity, "settings": settings, "objective": trained_objective}
        )

    # the loop: one optimizer step per grad_accum micro-batches, a metrics line every log_every steps
    trainer = Trainer(
        engine,
        cursor,
        grad_accum=cfg.train.grad_accum,
        seed=cfg.train.seed,
        max_nan_skips=cfg.train.max_nan_skips,
    )
    bar = tqdm(
        total=total_steps,
        initial=cursor.step,
        desc="train",
        dynamic_ncols=True,
        disable=args.no_progress or rank != 0,
    )
    batches = trainer.micro_batches(make_loader)
    while cursor.step < total_steps:
        result = trainer.step(next(batches))
        if cursor.step % cfg.train.log_every == 0 or cursor.step == total_steps:
            record = trainer.record(result)  # a collective: every rank
            if metrics is not None:
                metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.output.save_every and cursor.step % cfg.output.save_every == 0 and cursor.step < total_steps:
            save()
    bar.close()
    # the process's peak resident memory so far: the training's (the export below reloads the checkpoint)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    save()

    # export: fp32 weights (reconstructed from the ZeRO checkpoint), LoRA merged, projectors beside
    if cfg.output.export and rank == 0:
        card = {
            "teacher": cache.manifest.teacher["name"] if cache else None,
            "cache_fingerprint": identity["cache_fingerprint"],
            "steps": cursor.step,
            "final_metrics": metrics.last(),
        }
        path = export_trained(cfg, engine, ckpt_dir, cursor.step, tok, out / "export", card)
        info = {
            "step": cursor.step,
            "nan_skips": cursor.nan_skips,
            "tokens": cursor.tokens,
            "memory_rank0": {  # host memory; pipeline.plan's per-GPU estimate is checked against the growth
                "rss_before_model": rss_before_model,
                "peak_rss_training": peak_rss,
                "training_growth": peak_rss - rss_before_model,
            },
        }
        (out / "run_info.json").write_text(json.dumps(info, indent=2))
        print(
            f"[train] done at step {cursor.step}: student -> {path}; curves -> {metrics.plot()}", flush=True
        )
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
