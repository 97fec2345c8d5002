"""Memory and time of the cache job's attention salience (cache.salience=true, SRA), the two ways side by side.

    python benchmarks/salience.py [--batch 4] [--length 512] [--reps 3] [--salience=-1,24,26]

``hooks`` (what the job does): a forward hook on each asked-for attention block reduces its ``[B, H, P, P]``
map to the ``[B, P]`` salience as the block runs, so one map is alive at a time. ``outputs`` (the job before):
``output_attentions=True`` keeps every block's map until the forward ends, depth x ``[B, H, P, P]``.
Each measurement is a fresh process (the real SmolLM2-135M-Instruct teacher, eager attention, random ids of
``--batch`` x ``--length``), the two ways interleaved ``--reps`` times; reported: the forward's peak RSS above
the RSS after loading (sampled every 5 ms), its wall time, medians, and the salience of both ways compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(way: str, batch: int, length: int, salience: tuple[int, ...], out: str | None) -> dict:
    import torch

    from benchmarks.train_step import SMOLLM2, PeakRSS
    from pipeline.config import load_config
    from teacher_cache.job import CacheJobConfig
    from teacher_cache.teacher import load_teacher, teacher_forward

    torch.set_num_threads(2)
    cfg = load_config(CacheJobConfig, None, SMOLLM2)
    model = load_teacher(cfg.teacher)
    model.set_attn_implementation("eager")
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    mask = torch.ones_like(ids)
    mask[1::2, length // 2 :] = 0  # half the rows padded to half length, as a real batch is
    with PeakRSS() as rss:
        base = rss.proc.memory_info().rss
        t = time.perf_counter()
        res = teacher_forward(model, ids, mask, top_k=64, salience=salience, salience_via=way)
        seconds = time.perf_counter() - t
    if out:
        torch.save(res.salience, out)
    heads, depth = model.config.num_attention_heads, model.config.num_hidden_layers
    one_map = batch * heads * length * length * 4
    return {
        "way": way,
        "seconds": seconds,
        "peak_mb": (rss.peak - base) / 2**20,
        "one_map_mb": one_map / 2**20,
        "depth": depth,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--salience", default="-1,24,26", help="layers whose salience to keep (SRA's top three)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    salience = tuple(int(x) for x in args.salience.split(","))
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.length, salience, args.save)))
        return 0
    import torch

    rows: dict[str, list[dict]] = {"hooks": [], "outputs": []}
    saved = {}
    for rep in range(args.reps):
        for way in ("outputs", "hooks") if rep % 2 else ("hooks", "outputs"):
            save = str(Path("/tmp") / f"xtokd-salience-{way}.pt") if rep == 0 else None
            cmd = [sys.executable, __file__, "--child", way, "--batch", str(args.batch), "--length",
                   str(args.length), f"--salience={args.salience}"] + (["--save", save] if save else [])  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            rows[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if save:
                saved[way] = torch.load(save)
                Path(save).unlink()
    diff = max(float((saved["hooks"][n] - saved["outputs"][n]).abs().max()) for n in salience)
    med = {w: {k: statistics.median(r[k] for r in rows[w]) for k in ("seconds", "peak_mb")} for w in rows}
    info = rows["hooks"][0]
    print(
        f"SmolLM2-135M-Instruct, eager, batch {args.batch} x {args.length}, salience of layers {salience}; "
        f"one [B, H, P, P] fp32 map = {info['one_map_mb']:.0f} MiB, {info['depth']} blocks; medians of "
        f"{args.reps} fresh processes\n"
    )
    print("| way | forward peak RSS above load, MiB | forward s |")
    print("|---|---|---|")
    for w in ("outputs", "hooks"):
        print(f"| {w} | {med[w]['peak_mb']:.0f} | {med[w]['seconds']:.2f} |")
    print(
        f"\noutputs / hooks: memory {med['outputs']['peak_mb'] / med['hooks']['peak_mb']:.1f}x, "
        f"time {med['outputs']['seconds'] / med['hooks']['seconds']:.2f}x; largest salience difference {diff:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
