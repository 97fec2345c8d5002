"""The training loop and its bookkeeping: token-count normalisation, non-finite steps, checkpoints, metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from student_train.data import DistillBatch
from student_train.losses.objective import TERM_NAMES as TERMS


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs a pickled global outside the allow-list: refused, nothing in it was run."""


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """(rank, world size, local rank); works under the deepspeed launcher and as a plain single process.

    Every collective fails after ``timeout_s`` seconds instead of waiting forever for a dead rank.
    """
    from datetime import timedelta

    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s)
    )
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def all_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cosine_lambda(total_steps: int, warmup: int, base_lr: float, eta_min: float):
    """LR multiplier: linear warm-up then cosine to ``eta_min`` at ``total_steps`` (METHOD: T_max = total)."""
    floor = eta_min / base_lr if base_lr > 0 else 0.0

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@dataclass
class Cursor:
    """Where the run is: the next optimizer step and the next batch of the current epoch (per rank)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    nan_skips: int = 0
    tokens: int = 0


@dataclass
class MetricsLog:
    """Rank-0 metrics: JSONL + TensorBoard, and a PNG of the loss curves per term."""

    out_dir: Path
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if self.path.exists():
            self.records = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites the steps it repeats)."""
        self.records = [r for r in self.records if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, rec: dict) -> None:
        self.records.append(rec)
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, rec["step"])

    def plot(self) -> Path | None:
        if not self.records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = ["loss", *[f"term/{t}" for t in TERMS if any(r.get(f"term/{t}", 0) for r in self.records)]]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
        steps = [r["step"] for r in self.records]
        for ax, k in zip(axes[0], keys):
            ax.plot(steps, [r.get(k, float("nan")) for r in self.records], lw=1)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        path = self.out_dir / "loss_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.tb.flush()
        return path


def save_checkpoint(engine, ckpt_dir: Path, cursor: Cursor, extra: dict, keep: int = 2) -> None:
    """DeepSpeed checkpoint (all ranks) with the cursor as client state; 'latest' moves only when complete."""
    tag = f"step-{cursor.step:07d}"
    # DeepSpeed's own 'latest' is written by rank 0 as soon as rank 0 is done, while other ranks may still
    # be writing their shards: a kill then leaves 'latest' pointing at a truncated file. Move it ourselves,
    # atomically, after every rank has finished.
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"cursor": vars(cursor).copy(), **extra}, save_latest=False
    )
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        tags = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_safe_globals() -> list:
    """The only non-container, non-tensor types DeepSpeed 0.19 pickles into this trainer's checkpoints.

    ``*model_states.pt`` need none (tensors, dicts, lists, str, int, float, torch.Size); the ZeRO-1/2/3
    ``*optim_states.pt`` hold the optimizer's ``loss_scaler`` and ``zero_stage``, and ZeRO-1/2 the
    ``param_slice_mappings`` of ``fragment_address``. Plain classes: rebuilding them runs no code of theirs.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(allowed: list):
    """Every ``torch.load`` inside (DeepSpeed's too, which pass ``weights_only=False``) unpickles only tensors,
    plain containers and ``allowed``; anything else raises UnsafeCheckpointError naming the file and global."""
    real_load = torch.load
    names = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in allowed)

    def safe_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        if pickle_module is not None:
            raise UnsafeCheckpointError(f"{f}: refusing a torch.load with a custom pickle_module")
        try:
            with torch.serialization.safe_globals(allowed):
                return real_load(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f"the global {found.group(1)}" if found else "an object outside the weights-only set"
            raise UnsafeCheckpointError(
                f"{f}: refusing to unpickle {what}: this trainer's checkpoints hold only tensors, plain "
                f"containers and {names}, so this file was not written by it. Nothing in it was run; "
                "delete the checkpoint (or set output.resume=false) to start over"
            ) from None

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = real_load


RESUME_SAFE = (
    "output.",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.max_nan_skips",
    "train.collective_timeout_s",
    "data.verify_checksums",
    "data.num_workers",
)
"""Settings a run may change when it resumes (how long to train, logging, saving); anything else refuses."""


def resume_safe(key: str) -> bool:
    return any(key == s or key.startswith(s) for s in RESUME_SAFE)


def flat_config(cfg) -> dict:
    """A training config as ``{"section.key": value}`` (the objective's keys too)."""
    from pipeline.config import to_dict

    out: dict = {}

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out


def load_checkpoint(engine, ckpt_dir: Path, expect: dict, settings: dict | None = None) -> Cursor | None:
    """Resume from ``ckpt_dir/latest`` if present; refuses a checkpoint of another config or cache, and any
    file that would unpickle more than tensors and the few DeepSpeed types of ``checkpoint_safe_globals``."""
    if not (ckpt_dir / "latest").exists():
        return None
    with weights_only_loads(checkpoint_safe_globals()):
        path, client = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(
            f"{ckpt_dir}: 'latest' exists but the checkpoint could not be loaded; delete it to start over"
        )
    before = client.get("settings") or {}
    changed = {k: (before.get(k), v) for k, v in (settings or {}).items() if k in before and before[k] != v}
    for key, value in expect.items():
        if client.get(key) != value:
            named = {k: c for k, c in changed.items() if not resume_safe(k)}
            what = (
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in named.items())
                or f"{key}={client.get(key)!r}"
            )
            raise RuntimeError(
                f"{path}: this run differs from the checkpoint's in what it trains ({what}); use another "
                "output.dir, or set output.resume=false to start fresh"
            )
    safe = {k: c for k, c in changed.items() if resume_safe(k) and not k.startswith("output.")}
    if safe and dist.get_rank() == 0:
        print(
            "[train] resuming with changed " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in safe.items())
        )
    return Cursor(**client["cursor"])


def step_digests(ids: list[str], world: int, device) -> list[str]:
    """Per rank, a digest of the ordered sample ids the step consumed (audit: resumed vs uninterrupted runs).

    16 hex digits of sha256 over the ids joined by newlines, gathered from every rank in rank order.
    """
    import hashlib

    digest = hashlib.sha256("\n".join(ids).encode()).digest()[:8]
    mine = torch.tensor([int.from_bytes(digest, "big", signed=True)], dtype=torch.long, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return [int(t.item()).to_bytes(8, "big", signed=True).hex() for t in gathered]


def run_steps(
    engine,
    distiller,
    make_loader,
    cursor: Cursor,
    *,
    total_steps: int,
    grad_accum: int,
    batches_per_epoch: int,
    seed: int,
    max_nan_skips: int,
    log_every: int,
    save_every: int,
    on_save,
    metrics: MetricsLog | None,
    progress: bool = True,
) -> Cursor:
    """The loop: for each optimizer step, take grad_accum micro-batches, normalise by the global token count."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = engine.device
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=cursor.step, desc="train", dynamic_ncols=True)
    it = iter(make_loader(cursor.epoch, cursor.batch))
    t_last, tok_last = time.time(), 0
    while cursor.step < total_steps:
        micro: list[DistillBatch] = []
        while len(micro) < grad_accum:
            try:
                micro.append(next(it))
                cursor.batch += 1
            except StopIteration:
                cursor.epoch, cursor.batch = cursor.epoch + 1, 0
                it = iter(make_loader(cursor.epoch, 0))
        local_tokens = torch.tensor(float(sum(b.num_label_tokens for b in micro)), device=device)
        n_global = all_sum(local_tokens).item()
        scale = grad_accum * world / max(n_global, 1.0)  # undo DeepSpeed's 1/GA and 1/world averaging
        sums = torch.zeros(len(TERMS) + 2, device=device, dtype=torch.float64)  # loss, terms, cut samples
        window_bad = False
        ids = []
        lr_used = engine.optimizer.param_groups[0]["lr"]
        for j, b in enumerate(micro):
            torch.manual_seed(seed + 1_000_003 * cursor.step + 1009 * j + rank)  # dropout: exact on resume
            b = b.to(device)
            out = engine(b)
            bad = torch.tensor(float(not torch.isfinite(out.total).item()), device=device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() > 0:
                window_bad = True
                engine.backward(engine.module.zero_loss(b))
            else:
                engine.backward(out.total * scale)
                sums[0] += out.total.detach().double()
                sums[-1] += b.cut_vs_teacher
                for k, t in enumerate(TERMS):
                    sums[k + 1] += out.terms[t].double()
            ids.extend(b.sample_ids)
            # DeepSpeed counts micro-steps in step() and only updates at the accumulation boundary (the last one)
            if j == len(micro) - 1 and window_bad:
                # a skipped step: lr 0 leaves the parameters unchanged (Adam moments decay by one step)
                saved = [g["lr"] for g in engine.optimizer.param_groups]
                for g in engine.optimizer.param_groups:
                    g["lr"] = 0.0
                engine.step()
                for g, lr in zip(engine.optimizer.param_groups, saved):
                    g["lr"] = lr
            else:
                engine.step()
        if window_bad:
            cursor.nan_skips += 1
            if rank == 0:
                print(
                    f"[train] step {cursor.step}: non-finite loss, step skipped ({cursor.nan_skips}/{max_nan_skips})",
                    flush=True,
                )
            if cursor.nan_skips > max_nan_skips:
                raise NonFiniteLossError(
                    f"{cursor.nan_skips} steps had a non-finite loss (limit train.max_nan_skips={max_nan_skips}); "
                    "lower the learning rate, check the data, or use precision=fp32. The last good checkpoint is intact."
                )
        cursor.step += 1
        cursor.tokens += int(n_global)
        sums = all_sum(sums)
        logging_step = cursor.step % log_every == 0 or cursor.step == total_steps
        samples = step_digests(ids, world, device) if logging_step else None  # a collective: every rank
        if metrics is not None and logging_step:
            now = time.time()
            rec = {
                "step": cursor.step,
                "epoch": cursor.epoch,
                "loss": float(sums[0] / max(n_global, 1)),
                **{f"term/{t}": float(sums[k + 1] / max(n_global, 1)) for k, t in enumerate(TERMS)},
                "tokens": int(n_global),
                "tokens_per_s": (cursor.tokens - tok_last) / max(now - t_last, 1e-9),
                "lr": lr_used,
                "skipped": bool(window_bad),
                "nan_skips": cursor.nan_skips,
                "first_sample": ids[0] if ids else None,
                "cut_vs_teacher": int(sums[-1]),
                "samples": samples,
            }
            metrics.log(rec)
            t_last, tok_last = now, cursor.tokens
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if save_every and cursor.step % save_every == 0 and cursor.step < total_steps:
            on_save(cursor)
    if bar is not None:
        bar.close()
    return cursor
