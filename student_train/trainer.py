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

from pipeline.models import file_sha256
from student_train.data import DistillBatch
from student_train.losses.config import TERM_NAMES as TERMS


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
    if "MASTER_PORT" not in os.environ:  # one process without a launcher: a port the OS says is free (a
        # port derived from the pid collided with another job's, which then failed with EADDRINUSE)
        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s)
    )
    if backend == "gloo":  # DeepSpeed's shm all-reduce exists on CPU only
        release_shm_buffer(dist.get_rank())
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name (``/dev/shm/deepspeed_allreduce_buffer_*``).

    DeepSpeed's shm communication (CPU) creates a 69 MB segment per rank and never unlinks it: every CPU run
    left its segments in /dev/shm (RAM) until reboot. Once every rank has mapped every other rank's segment
    (done inside ``init_distributed``; the barrier makes sure all ranks got there) the names can go: the
    mappings stay valid and the memory is freed when the last process exits, even after a kill -9.
    """
    import glob

    dist.barrier()
    port = os.environ.get("MASTER_PORT", "")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        Path(path).unlink(missing_ok=True)


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

    def last(self) -> dict:
        """The last record's loss and per-term values (those the run computes), for the model card."""
        if not self.records:
            return {}
        rec = self.records[-1]
        return {k: v for k, v in rec.items() if (k == "loss" or k.startswith("term/")) and v}

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
    record_checksums(ckpt_dir / tag, dist.get_rank())
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        tags = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


CHECKSUM_DIR = "xtokd_checksums"
_RANK_FILE = re.compile(r"^zero_pp_rank_(\d+)_")


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint file differs from (or is missing in) the checksums recorded when it was saved."""


def record_checksums(tag_dir: Path, rank: int) -> None:
    """sha256 of the checkpoint files this rank owns (its ``zero_pp_rank_<rank>_*`` files; rank 0 also the
    shared ones), in ``<tag>/xtokd_checksums/rank-<rank>.json``: one writer per file, also without a shared
    filesystem."""

    def owned(name: str) -> bool:
        m = _RANK_FILE.match(name)
        return int(m.group(1)) == rank if m else rank == 0

    sums = {p.name: file_sha256(p) for p in sorted(tag_dir.iterdir()) if p.is_file() and owned(p.name)}
    out = tag_dir / CHECKSUM_DIR
    out.mkdir(exist_ok=True)
    tmp = out / f"rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(sums, indent=1))
    os.replace(tmp, out / f"rank-{rank}.json")


def verify_checksums(tag_dir: Path) -> None:
    """Every file of the checkpoint visible here against the checksums recorded at save time; a file that is
    not listed (planted), or whose sha256 differs (swapped or damaged), is refused before anything reads it."""
    recorded: dict[str, str] = {}
    for part in sorted((tag_dir / CHECKSUM_DIR).glob("rank-*.json")):
        recorded.update(json.loads(part.read_text()))
    if not recorded:
        raise CheckpointIntegrityError(
            f"{tag_dir}: no {CHECKSUM_DIR}/ (a checkpoint from an older release, or a damaged one): its files "
            "cannot be checked; set output.resume=false to start over"
        )
    for p in sorted(tag_dir.iterdir()):
        if not p.is_file():
            continue
        if p.name not in recorded:
            raise CheckpointIntegrityError(
                f"{p}: not among the files this checkpoint was saved with; refusing to load it (remove it, or "
                "set output.resume=false)"
            )
        if file_sha256(p) != recorded[p.name]:
            raise CheckpointIntegrityError(
                f"{p}: its sha256 differs from the one recorded when the checkpoint was saved (the file was "
                "replaced or damaged); refusing to load it"
            )


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
    "objective.teacher_chunk_size",  # the objective is the same for any chunk (only rounding moves)
    "objective.check_inputs",
)
"""Settings a run may change when it resumes (how long to train, logging, saving, how the same objective is
computed); anything else refuses."""


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


def default_settings() -> dict:
    """The flat settings of a default training config (what a key added by a newer release is worth)."""
    from student_train.config import TrainConfig

    return flat_config(TrainConfig())


def changed_settings(before: dict, now: dict, defaults: dict) -> dict[str, tuple]:
    """``{key: (checkpoint's value, this run's value)}`` for every setting that differs. A key the checkpoint
    lacks (added by a newer release) counts only when this run moves it off its default; a key this run lacks
    (removed since) does not count: it can no longer be set."""
    changed = {}
    for key, value in now.items():
        if key in before:
            if before[key] != value:
                changed[key] = (before[key], value)
        elif key not in defaults or defaults[key] != value:
            changed[key] = ("<absent>", value)
    return changed


ABSENT_MEANT: dict = {}
"""What an objective field meant in a checkpoint whose record lacks it (written before the field existed), where
the field came with a default that differs from the old behaviour; any field not listed reproduced the old
behaviour at its default. Empty so far: the record came after the last such field (``teacher_entropy``)."""

BEFORE_RECORD = {
    "teacher_entropy": (
        "eq 14's teacher entropy was rebuilt from the head before b20a1dd (session 7) and read from the cache "
        "from then on",
        lambda r: r.get("lambda_kd", 0) > 0 and bool(r.get("entropy_weighting")),
    ),
}
"""Fields whose value a checkpoint written before checkpoints recorded their objective cannot tell (its default
moved while the settings did not say it): ``field -> (what it was when, whether it changes this objective)``.
Resuming such a checkpoint with an objective where the field matters needs the field set explicitly."""


def _matters(key: str, record: dict) -> bool:
    return key not in BEFORE_RECORD or BEFORE_RECORD[key][1](record)


def changed_objective(before: dict, now: dict) -> dict[str, tuple]:
    """``{"objective.<field>": (checkpoint's value, this run's value)}`` for every field of the resolved
    objective (:class:`ObjectiveConfig` as a dict, preset and overrides applied) that differs and changes the
    loss: a default moved by a newer release shows here although the run's own settings did not change."""
    changed = {}
    for key, value in now.items():
        if key in before:
            was, shown = before[key], before[key]
        else:
            was = ABSENT_MEANT.get(key, value)
            shown = f"<absent: {was!r}>"
        if was != value and (_matters(key, before) or _matters(key, now)):
            changed[f"objective.{key}"] = (shown, value)
    return changed


def objective_record(objective) -> dict:
    """The resolved objective as a checkpoint stores it (plain values: the weights-only loader reads it)."""
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(objective).items()}


def checkpoint_objective(client: dict, before: dict, now_settings: dict) -> tuple[dict | None, dict]:
    """The resolved objective a checkpoint trained, and ``{"objective.<field>": (what it cannot tell, hint)}``
    for the :data:`BEFORE_RECORD` fields it leaves open. A checkpoint's record is taken when it has the shape of
    one; a checkpoint from before the record has its settings resolved by this code, taking this run's word
    (``now_settings``) for the open fields it sets. ``(None, {})`` when those settings no longer resolve."""
    from student_train.losses.config import ObjectiveConfig

    record = client.get("objective")
    if isinstance(record, dict) and "method" in record and all(isinstance(k, str) for k in record):
        return record, {}
    values = {k.removeprefix("objective."): v for k, v in before.items() if k.startswith("objective.")}
    told = {k: now_settings[f"objective.{k}"] for k in BEFORE_RECORD if f"objective.{k}" in now_settings}
    try:
        resolved = objective_record(ObjectiveConfig.from_dict({"check_inputs": False, **values, **told}))
    except ValueError:
        return None, {}
    open_ = {
        f"objective.{k}": (f"<unknown: {when}>", f"set objective.{k}= to what the checkpoint trained with")
        for k, (when, matters) in BEFORE_RECORD.items()
        if k not in values and k not in told and matters(resolved)
    }
    return resolved, open_


def load_checkpoint(
    engine, ckpt_dir: Path, expect: dict, settings: dict | None = None, objective: dict | None = None
) -> Cursor | None:
    """Resume from ``ckpt_dir/latest`` if present; refuses a checkpoint of another config or cache (its settings,
    and its resolved ``objective`` record against this run's when it has one), and any file that would
    unpickle more than tensors and the few DeepSpeed types of ``checkpoint_safe_globals``."""
    if not (ckpt_dir / "latest").exists():
        return None
    verify_checksums(ckpt_dir / (ckpt_dir / "latest").read_text().strip())
    with weights_only_loads(checkpoint_safe_globals()):
        path, client = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(
            f"{ckpt_dir}: 'latest' exists but the checkpoint could not be loaded; delete it to start over"
        )
    before, open_ = client.get("settings"), {}
    if before is None or settings is None:  # a checkpoint without its settings: only the identity hash
        changed, blocking = {}, [k for k, v in expect.items() if client.get(k) != v]
    else:
        changed = changed_settings(before, settings, default_settings())
        trained, open_ = checkpoint_objective(client, before, settings) if objective else (None, {})
        if trained is not None:  # the objective compared as resolved, not as written
            changed = {k: c for k, c in changed.items() if not k.startswith("objective.")}
            changed.update(changed_objective(trained, objective))
            changed.update(
                {k: (unknown, objective[k[len("objective.") :]]) for k, (unknown, _) in open_.items()}
            )
        blocking = [k for k in changed if not resume_safe(k)]
        blocking += [k for k, v in expect.items() if k != "config_hash" and client.get(k) != v]
    if blocking:
        what = ", ".join(
            f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" if k in changed else f"{k}={client.get(k)!r}"
            for k in blocking
        )
        hints = "".join(f"; {k}: {hint}" for k, (_, hint) in open_.items() if k in blocking)
        raise RuntimeError(
            f"{path}: this run differs from the checkpoint's in what it trains ({what}){hints}; use another "
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


def make_optimizer(cfg, distiller, total_steps: int):
    """AdamW over the trainable student parameters and (own LR) the projectors; warm-up + cosine LR."""
    groups = [{"params": [p for p in distiller.student.parameters() if p.requires_grad], "lr": cfg.optim.lr}]
    if distiller.projectors is not None:
        params = [p for p in distiller.projectors.parameters() if p.requires_grad]
        groups.append({"params": params, "lr": cfg.optim.projector_lr})
    opt = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    lr_fn = cosine_lambda(total_steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.eta_min)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [lr_fn] * len(groups))


@dataclass
class StepResult:
    """What one optimizer step saw: global sums (loss, every term, cut samples) and this rank's samples."""

    sums: torch.Tensor  # [len(TERMS) + 2] float64, summed over ranks
    tokens: int  # global label tokens of the step
    sample_ids: list[str]
    lr: float
    skipped: bool


class Trainer:
    """Optimizer steps over ``grad_accum`` micro-batches each, normalised by the global token count.

    Owns the data cursor: :meth:`micro_batches` advances ``cursor.epoch`` / ``cursor.batch`` as it hands out
    batches, :meth:`step` advances ``cursor.step`` / ``cursor.tokens``, so a checkpoint of the cursor taken
    between steps resumes exactly.
    """

    def __init__(self, engine, cursor: Cursor, *, grad_accum: int, seed: int, max_nan_skips: int):
        self.engine, self.cursor = engine, cursor
        self.grad_accum, self.seed, self.max_nan_skips = grad_accum, seed, max_nan_skips
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._t_last, self._tok_last = time.time(), cursor.tokens

    def micro_batches(self, make_loader):
        """Lists of ``grad_accum`` micro-batches, crossing epochs (``make_loader(epoch, start_batch)``)."""
        c = self.cursor
        it = iter(make_loader(c.epoch, c.batch))
        while True:
            micro: list[DistillBatch] = []
            while len(micro) < self.grad_accum:
                try:
                    micro.append(next(it))
                    c.batch += 1
                except StopIteration:
                    c.epoch, c.batch = c.epoch + 1, 0
                    it = iter(make_loader(c.epoch, 0))
            yield micro

    def step(self, micro: list[DistillBatch]) -> StepResult:
        """Forward, backward and one optimizer update (skipped, with lr 0, when any rank saw a non-finite loss)."""
        engine, device, c = self.engine, self.engine.device, self.cursor
        local_tokens = torch.tensor(float(sum(b.num_label_tokens for b in micro)), device=device)
        n_global = all_sum(local_tokens).item()
        scale = (
            self.grad_accum * self.world / max(n_global, 1.0)
        )  # undo DeepSpeed's 1/GA and 1/world averaging
        # loss, terms, span fallbacks, cut samples
        sums = torch.zeros(len(TERMS) + 3, device=device, dtype=torch.float64)
        window_bad, ids = False, []
        lr_used = engine.optimizer.param_groups[0]["lr"]
        for j, b in enumerate(micro):
            torch.manual_seed(
                self.seed + 1_000_003 * c.step + 1009 * j + self.rank
            )  # dropout: exact on resume
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
                sums[-2] += b.span_fallbacks
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
            c.nan_skips += 1
            if self.rank == 0:
                print(
                    f"[train] step {c.step}: non-finite loss, step skipped ({c.nan_skips}/{self.max_nan_skips})",
                    flush=True,
                )
            if c.nan_skips > self.max_nan_skips:
                raise NonFiniteLossError(
                    f"{c.nan_skips} steps had a non-finite loss (limit train.max_nan_skips={self.max_nan_skips}); "
                    "lower the learning rate, check the data, or use precision=fp32. The last good checkpoint is intact."
                )
        c.step += 1
        c.tokens += int(n_global)
        return StepResult(all_sum(sums), int(n_global), ids, lr_used, window_bad)

    def record(self, res: StepResult) -> dict:
        """The metrics line of a step. A collective (the per-rank sample digests): every rank calls it."""
        samples = step_digests(res.sample_ids, self.world, self.engine.device)
        now, n = time.time(), max(res.tokens, 1)
        rec = {
            "step": self.cursor.step,
            "epoch": self.cursor.epoch,
            "loss": float(res.sums[0] / n),
            **{f"term/{t}": float(res.sums[k + 1] / n) for k, t in enumerate(TERMS)},
            "tokens": res.tokens,
            "tokens_per_s": (self.cursor.tokens - self._tok_last) / max(now - self._t_last, 1e-9),
            "lr": res.lr,
            "skipped": res.skipped,
            "nan_skips": self.cursor.nan_skips,
            "first_sample": res.sample_ids[0] if res.sample_ids else None,
            "cut_vs_teacher": int(res.sums[-1]),
            "span_fallbacks": int(res.sums[-2]),
            "samples": samples,
        }
        self._t_last, self._tok_last = now, self.cursor.tokens
        return rec
