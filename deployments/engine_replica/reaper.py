"""Ends a replica's engine processes when the replica dies without shutting them down.

vLLM runs its engine core (and tensor-parallel workers) as child processes of the LLMServer replica.
When Ray kills the replica's process (`ray.kill`, a failed health check, node drain, OOM), they are
re-parented and keep running: busy on the CPU, holding the GPU memory the replacement replica needs.
A small watcher process, started once the engine is up, notices its parent's death within a second
and kills exactly the processes it was given (matched by pid and start time, so a recycled pid is safe),
then removes the folder of the engine's socket files (vLLM leaves them behind).
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCH = """
import os, shutil, sys, time, psutil
parent = int(sys.argv[1])
folders = [a[len("rm:"):] for a in sys.argv[2:] if a.startswith("rm:")]
targets = [(int(p), float(t)) for p, t in (a.split(":") for a in sys.argv[2:] if not a.startswith("rm:"))]
while os.getppid() == parent:
    time.sleep(1.0)
for pid, started in targets:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) < 0.01:
            proc.kill()
    except psutil.Error:
        pass
for folder in folders:
    shutil.rmtree(folder, ignore_errors=True)
"""


def watch_engine_processes(folders: list[str] = ()) -> subprocess.Popen | None:
    """Start the watcher for this process's current children (the engine's), which also removes
    `folders` (the engine's socket files); None if there is nothing to watch."""
    import psutil

    children = psutil.Process().children(recursive=True)
    if not children and not folders:
        return None
    targets = [f"{c.pid}:{c.create_time()}" for c in children] + [f"rm:{f}" for f in folders]
    return subprocess.Popen(
        [sys.executable, "-c", _WATCH, str(os.getpid()), *targets],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
