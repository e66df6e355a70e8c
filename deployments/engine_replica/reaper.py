"""Ends a replica's engine processes when the replica dies without shutting them down.

vLLM runs its engine core (and tensor-parallel workers) as child processes of the LLMServer replica.
When Ray kills the replica's process (`ray.kill`, a failed health check, node drain, OOM), they are
re-parented and keep running: busy on the CPU, holding the GPU memory the replacement replica needs.
A small watcher process, started once the engine is up, notices its parent's death within a second
and kills exactly the processes it was given (matched by pid and start time, so a recycled pid is safe).
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCH = """
import os, sys, time, psutil
parent = int(sys.argv[1])
targets = [(int(p), float(t)) for p, t in (a.split(":") for a in sys.argv[2:])]
while os.getppid() == parent:
    time.sleep(1.0)
for pid, started in targets:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) < 0.01:
            proc.kill()
    except psutil.Error:
        pass
"""


def watch_engine_processes() -> subprocess.Popen | None:
    """Start the watcher for this process's current children (the engine's); None if there are none."""
    import psutil

    children = psutil.Process().children(recursive=True)
    if not children:
        return None
    targets = [f"{c.pid}:{c.create_time()}" for c in children]
    return subprocess.Popen(
        [sys.executable, "-c", _WATCH, str(os.getpid()), *targets],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
