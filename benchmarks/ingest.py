"""Cache-job ingestion at scale: the driver's memory against the number of records, side by side in one run.

    python benchmarks/ingest.py [--records 25000,50000,100000,200000] [--writers 2] [--work DIR]

For each size N: N synthetic records (pipeline.tiny, DSKD jsonl) go through the real cache job
(``python -m teacher_cache.job``: local Ray cluster, Ray Data read of the staged shards, tokeniser actor,
teacher actor, a pool of shard writers, manifest) with a tiny random teacher (1 layer, width 32, a 600-token
BPE), so that the records, not the teacher, are what grows. The driver's resident memory is sampled from
/proc every 0.2 s; reported are its peak (VmHWM) and the RSS when the first and the last shard were written.
Beside it, the memory the driver held before the streaming rewrite for the same N: the list of all
records plus the per-row dicts it handed to ``ray.data.from_items``, measured in a child process as the
growth of its RSS (the object store's copy of those rows came on top).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.tiny import save_tiny_model, synthetic_records, synthetic_tokenizer, write_jsonl  # noqa: E402


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_job(data: Path, teacher: Path, out: Path, writers: int, rows_per_shard: int) -> dict:
    cmd = [
        sys.executable, "-m", "teacher_cache.job", "--no-progress",
        f"data.path={data}", f"teacher.path={teacher}", f"cache.output={out}",
        f"cache.rows_per_shard={rows_per_shard}", "cache.max_length=64", "cache.max_prompt_length=48",
        "cache.top_k=4", "ray.batch_size=256", f"ray.writer_concurrency={writers}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    samples: list[tuple[float, int, int]] = []  # (time, rss, hwm)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = _status(proc.pid)
            if s:
                samples.append((time.time() - t0, s.get("VmRSS", 0), s.get("VmHWM", 0)))
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    shards: list[tuple[float, int]] = []  # (time, shard number) as the job prints them
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        m = re.search(r"shard (\d+)/(\d+) written", line)
        if m:
            shards.append((time.time() - t0, int(m.group(1))))
    rc = proc.wait()
    stop.set()
    th.join()
    if rc != 0:
        raise RuntimeError(f"cache job failed ({rc}):\n{''.join(tail)}")
    manifest = json.loads((out / "manifest.json").read_text())

    def rss_at(t: float) -> int:
        before = [r for (ts, r, _) in samples if ts <= t]
        return before[-1] if before else 0

    return {
        "seconds": time.time() - t0,
        "rows": manifest["stats"]["rows"],
        "shards": len(manifest["shards"]),
        "peak_rss": max(h for (_, _, h) in samples),
        "rss_first_shard": rss_at(shards[0][0]) if shards else 0,
        "rss_last_shard": rss_at(shards[-1][0]) if shards else 0,
    }


_OLD = """
import sys, psutil
sys.path.insert(0, sys.argv[2])
from pipeline.records import DataConfig, read_records
rss = lambda: psutil.Process().memory_info().rss
base = rss()
records = list(read_records(DataConfig(path=sys.argv[1])))
items = [{"shard": i // 1024, "source_index": i, "sample_id": r.sample_id, "prompt": r.prompt,
          "response": r.response} for i, r in enumerate(records)]
print(rss() - base)
"""


def old_driver_bytes(data: Path) -> int:
    """What the driver held before the streaming rewrite: every record and its from_items row dict."""
    out = subprocess.run(
        [sys.executable, "-c", _OLD, str(data), str(REPO)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="25000,50000,100000,200000")
    ap.add_argument("--writers", type=int, default=2, help="ray.writer_concurrency")
    ap.add_argument("--rows-per-shard", type=int, default=2048)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="xtokd-ingest-"))
    if not args.work:
        atexit.register(shutil.rmtree, work, True)
    work.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        tok = synthetic_tokenizer(work / "tokenizer")
        save_tiny_model(teacher, "llama", tok, hidden=32, layers=1)
    sizes = [int(x) for x in args.records.split(",")]
    rows = []
    for n in sizes:
        data = write_jsonl(synthetic_records(n, seed=n), work / f"records-{n}.jsonl")
        res = run_job(data, teacher, work / f"cache-{n}", args.writers, args.rows_per_shard)
        res.update(records=n, old_driver=old_driver_bytes(data), source_mb=data.stat().st_size / 1e6)
        rows.append(res)
        print(json.dumps(res), flush=True)
    mb = 1 / 2**20
    print(
        f"\nwriters {args.writers}, rows per shard {args.rows_per_shard}, tiny teacher (1 layer, width 32)\n"
    )
    print(
        "| records | source MB | rows kept | shards | job s | driver peak RSS MiB | RSS at first shard | "
        "RSS at last shard | before: records + from_items rows MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['records']:,} | {r['source_mb']:.1f} | {r['rows']:,} | {r['shards']} | {r['seconds']:.0f} | "
            f"{r['peak_rss'] * mb:.0f} | {r['rss_first_shard'] * mb:.0f} | {r['rss_last_shard'] * mb:.0f} | "
            f"{r['old_driver'] * mb:.0f} |"
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        slope = (b["peak_rss"] - a["peak_rss"]) / (b["records"] - a["records"])
        old = (b["old_driver"] - a["old_driver"]) / (b["records"] - a["records"])
        print(
            f"\ndriver peak RSS slope: {slope:.0f} B/record now; the records + from_items rows alone grew "
            f"{old:.0f} B/record before (ratio {old / max(slope, 1e-9):.1f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
