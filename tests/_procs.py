"""Process helpers shared by the integration tests (failure injection: killing real jobs)."""

from __future__ import annotations

import contextlib
import signal


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (local Ray's gcs/raylet/workers, deepspeed's ranks)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
