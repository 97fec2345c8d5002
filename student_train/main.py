"""Train a student from a teacher cache (or plain SFT) under DeepSpeed ZeRO.

    deepspeed --num_gpus N student_train/main.py --config configs/train/<x>.yaml [key=value ...]
    python student_train/main.py --config ... [key=value ...]          # one process

Story: config -> distributed init -> cache and tokenizer -> student and projectors -> data ->
optimizer and DeepSpeed engine -> resume -> loop -> checkpoint and export. The student job never builds
the teacher: teacher distributions come from cached hidden states x the cached head.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipeline.config import config_hash, describe, load_config, to_dict
from student_train.config import TrainConfig
from student_train.losses.objective import PRESETS, ObjectiveConfig


def parse(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        prog="student_train/main.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override with key=value):\n"
        + "\n".join(describe(TrainConfig))
        + "\n\nobjective keys (objective.preset= one of "
        + ", ".join(sorted(PRESETS))
        + "; any key below overrides the preset's value):\n"
        + "\n".join(describe(ObjectiveConfig, "objective.")),
    )
    ap.add_argument("--config", help="YAML (configs/train/*.yaml)")
    ap.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file + overrides + defaults) and the objective it selects, then exit",
    )
    ap.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.zero_stage=3 lora.enabled=true"
    )
    args = ap.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ValueError as e:  # a user mistake in the config: one line, not a traceback
        ap.exit(2, f"error: {e}\n")
    if args.print_config:
        import dataclasses

        import yaml

        resolved = {**to_dict(cfg), "objective": dataclasses.asdict(cfg.objective_config())}
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        sys.exit(0)
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse(argv)  # before deepspeed is imported: --help and --print-config print only their own text
    import deepspeed

    from pipeline.records import DataConfig, read_records
    from student_train.align import BatchAlignment, MinedVocab
    from student_train.data import CacheRows, RecordRows, Schedule, ScheduledBatches, collate_kwargs
    from student_train.losses.cma import Projectors
    from student_train.model import Distiller, export_student, load_student, load_student_tokenizer
    from student_train.trainer import (
        MetricsLog,
        checkpoint_safe_globals,
        cosine_lambda,
        flat_config,
        init_distributed,
        load_checkpoint,
        resume_safe,
        run_steps,
        save_checkpoint,
        weights_only_loads,
    )
    from teacher_cache.reader import CacheExpectation, open_cache

    objective = cfg.objective_config()
    rank, world, _ = init_distributed(cfg.train.collective_timeout_s)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.output.dir)

    # data source: the teacher cache (validated against what the config expects), or records for SFT
    cache = None
    if cfg.data.cache:
        cache = open_cache(
            cfg.data.cache,
            expect=CacheExpectation(
                teacher_name=cfg.data.expect_teacher, tokenizer_sha256=cfg.data.expect_tokenizer_sha256
            ),
        )
        shard_rows = [s["rows"] for s in cache.shards]
        if cfg.data.verify_checksums:
            cache.verify(cache.shard_indices_for(rank, world))
    else:
        records = list(read_records(DataConfig(path=cfg.data.sft_path)))
        shard_rows = [1] * len(records)
    tok = load_student_tokenizer(cfg)
    # what the objective needs beyond the cached tensors: pairings computed per sample at collation
    alignment, mined = None, None
    if objective.needs_offsets_pairing or objective.needs_mined_alignment or objective.logit_kd == "uld_topk":
        if objective.logit_kd == "uld_topk" and int(cache.manifest["settings"].get("top_k") or 0) < 1:
            raise ValueError(f"{cfg.data.cache} has no topk_logprobs column (top_k=0): uld_topk needs it")
        if objective.needs_mined_alignment:
            mined = MinedVocab(cache.load_teacher_tokenizer(cfg.data.teacher_tokenizer), tok)
        alignment = BatchAlignment(
            offsets=objective.needs_offsets_pairing, mined=mined, topk=objective.logit_kd == "uld_topk"
        )
    collate_kw = collate_kwargs(cfg, tok, with_teacher=objective.needs_teacher, alignment=alignment)

    # student, projectors, and the teacher constants (head and embeddings: read-only, never a teacher model)
    student = load_student(cfg)
    projectors, t_head, t_bias, t_emb = None, None, None, None
    if objective.needs_projectors:
        d_s = student.get_input_embeddings().weight.shape[1]
        projectors = Projectors(d_s, cache.hidden_size, dtw_embed=objective.dtw_enabled)
        t_emb = cache.load_embeddings().float()
    if objective.needs_teacher_head:
        t_head, t_bias = cache.load_head()  # the bias, when the teacher's head has one, is applied too
        t_head, t_bias = t_head.float(), (None if t_bias is None else t_bias.float())
    mined_map = tuple(torch.from_numpy(a) for a in mined.image()) if mined is not None else None
    distiller = Distiller(student, projectors, objective, t_head, t_emb, mined_map, t_bias)

    # schedule of batches, optimizer with a projector group, cosine LR
    sched = Schedule(shard_rows, rank, world, cfg.train.micro_batch, cfg.train.seed, cfg.data.shuffle_buffer)
    steps_per_epoch = sched.batches_per_epoch // cfg.train.grad_accum
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": cfg.optim.lr}]
    if projectors is not None:
        groups.append({"params": list(projectors.parameters()), "lr": cfg.optim.projector_lr})
    opt = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    lr_fn = cosine_lambda(total_steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.eta_min)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_fn] * len(groups))
    engine, _, _, _ = deepspeed.initialize(
        model=distiller, optimizer=opt, lr_scheduler=lr_sched, config=cfg.deepspeed_config(world)
    )

    # resume: the checkpoint must come from the same config (but for how long to train, logging and saving)
    # and the same cache
    settings = flat_config(cfg)
    identity = {
        "config_hash": config_hash({k: v for k, v in settings.items() if not resume_safe(k)}),
        "cache_fingerprint": cache.manifest["job_fingerprint"] if cache else None,
    }
    ckpt_dir = out / "checkpoints"
    cursor = load_checkpoint(engine, ckpt_dir, identity, settings) if cfg.output.resume else None
    if rank == 0:  # what this run resolved, for operators and for the next resume
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
        (out / "deepspeed_config.json").write_text(json.dumps(cfg.deepspeed_config(world), indent=2))
    from student_train.trainer import Cursor

    cursor = cursor or Cursor()
    metrics = MetricsLog(out) if rank == 0 else None
    if metrics is not None:
        metrics.truncate_after(cursor.step)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        print(
            f"[train] {objective.method}: world {world}, micro-batch {cfg.train.micro_batch} x grad-accum "
            f"{cfg.train.grad_accum} x {world} = global batch {cfg.train.micro_batch * cfg.train.grad_accum * world}; "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps; {trainable / 1e6:.2f}M trainable params; "
            f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}"
            + (
                f"; cache {cache.num_rows} rows, {cache.manifest['stats']['bytes_per_position']:.0f} B/position, "
                f"{sched.dropped_per_epoch} rows/epoch dropped to keep ranks in step"
                if cache
                else ""
            )
            + (
                f"; resuming at step {cursor.step} (epoch {cursor.epoch}, batch {cursor.batch})"
                if cursor.step
                else ""
            ),
            flush=True,
        )

    source = CacheRows(cache) if cache else RecordRows(records)

    def make_loader(epoch: int, start: int):
        ds = ScheduledBatches(source, sched, epoch, start, collate_kw)
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.data.num_workers)

    def on_save(c):
        save_checkpoint(engine, ckpt_dir, c, {**identity, "settings": settings})

    cursor = run_steps(
        engine,
        distiller,
        make_loader,
        cursor,
        total_steps=total_steps,
        grad_accum=cfg.train.grad_accum,
        batches_per_epoch=sched.batches_per_epoch,
        seed=cfg.train.seed,
        max_nan_skips=cfg.train.max_nan_skips,
        log_every=cfg.train.log_every,
        save_every=cfg.output.save_every,
        on_save=on_save,
        metrics=metrics,
        progress=not args.no_progress,
    )
    on_save(cursor)

    # export: fp32 weights reconstructed from the ZeRO checkpoint (any stage), LoRA merged, projectors beside
    if cfg.output.export and rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if cfg.train.zero_stage == 0:
            state = {k: v.float().cpu() for k, v in engine.module.state_dict().items()}
        else:  # reads every *_states.pt in the tag folder: the same weights-only guard as resume
            with weights_only_loads(checkpoint_safe_globals()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=f"step-{cursor.step:07d}")
        path = export_student(cfg, state, tok, out / "export")
        plot = metrics.plot()
        # the promise of the design, recorded for tests and operators: no Ray, no teacher model here
        from transformers import PreTrainedModel

        info = {
            "ray_imported": "ray" in sys.modules,
            "teacher_loader_imported": "teacher_cache.teacher" in sys.modules,
            "models_alive": sorted(
                {type(o).__name__ for o in gc.get_objects() if isinstance(o, PreTrainedModel)}
            ),
            "step": cursor.step,
            "nan_skips": cursor.nan_skips,
            "tokens": cursor.tokens,
        }
        (out / "run_info.json").write_text(json.dumps(info, indent=2))
        print(f"[train] done at step {cursor.step}: student -> {path}; curves -> {plot}", flush=True)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
