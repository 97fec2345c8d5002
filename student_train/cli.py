"""The student job's command line: parsing, ``--print-config``, and the line a run prints before it starts.

Kept apart from ``main.py`` so that the entry point reads as the training story, and importable without
DeepSpeed (``--help`` and ``--print-config`` print only their own text).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import describe, load_config, print_config, to_dict
from student_train.config import TrainConfig
from student_train.losses.config import PRESETS, ObjectiveConfig

USAGE = """Train a student from a teacher cache (or plain SFT) under DeepSpeed ZeRO.

    deepspeed --num_gpus N student_train/main.py --config configs/train/<x>.yaml [key=value ...]
    python student_train/main.py --config ... [key=value ...]          # one process
"""


def parse(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        prog="student_train/main.py",
        description=USAGE,
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

        print_config({**to_dict(cfg), "objective": dataclasses.asdict(cfg.objective_config())})
        sys.exit(0)
    if cfg.train.precision == "fp16":  # checked here, where it runs (a login node may print configs)
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            ap.exit(
                2,
                f"error: train.precision=fp16: DeepSpeed does not support fp16 on this device "
                f"({get_accelerator().device_name()}); use bf16 or fp32 here, fp16 on a GPU\n",
            )
    return cfg, args


def banner(cfg, objective, world, steps_per_epoch, total_steps, trainable, cache, sched, cursor) -> str:
    """The one line a run prints before its first step."""
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * world
    parts = [
        f"[train] {objective.method}: world {world}, micro-batch {cfg.train.micro_batch} x grad-accum "
        f"{cfg.train.grad_accum} x {world} = global batch {global_batch}",
        f"{steps_per_epoch} steps/epoch, {total_steps} steps",
        f"{trainable / 1e6:.2f}M trainable params",
        f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}",
    ]
    if cache is not None:
        parts.append(
            f"cache {cache.num_rows} rows, {cache.manifest.stats.bytes_per_position:.0f} B/position, "
            f"{sched.dropped_per_epoch} rows/epoch dropped to keep ranks in step"
        )
    if cursor.step:
        parts.append(f"resuming at step {cursor.step} (epoch {cursor.epoch}, batch {cursor.batch})")
    return "; ".join(parts)
