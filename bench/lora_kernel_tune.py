"""Tune vLLM's two LoRA kernels (shrink: x @ A, expand: . @ B) for this GPU and a model's shapes, and
write the files that vLLM reads from `VLLM_TUNED_CONFIG_FOLDER` ({GPU}_SHRINK.json,
{GPU}_EXPAND_TRUE.json, {GPU}_EXPAND_FALSE.json). lorafleet ships the result in
serve_app/assets/lora_kernels/ (issue 22: on the GPU a LoRA step's extra cost is these kernels').

    python bench/lora_kernel_tune.py MODEL_DIR --out FOLDER [--ranks 8 16] [--max-loras 64]
        [--modules qkv o gate_up down] [--tp 1] [--wide]   # --wide: more warps/stages for decode (not yet run)
    python bench/lora_kernel_tune.py MODEL_DIR --out FOLDER --rebuild "NVIDIA H200"   # files from its report

Why vLLM's defaults lose on decode: for fewer than 128 tokens the shrink runs split_k 64 with
block_k 256, so for a 3,584-wide hidden state 50 of its 64 K-splits have no work and still add a
zero tile atomically, for every adapter in the batch; and both kernels use 32- or 64-row blocks
where each adapter has one decoding token. The search below times each candidate in a CUDA graph
(what the engine replays on decode), for 1, 8 and up to 64 distinct adapters among the tokens, and
keeps per batch size the one with the best mean ratio to vLLM's default over those counts (one
adapter's speed weighs as much as many's; a kept config can still be slower for one count).
Every kept config's output is checked against the default's.

This script calls vLLM's kernel ops directly, as vLLM's own benchmarks/kernels/benchmark_lora.py
does; the product only sets the environment variable (serve_app/platform.py) and ships the files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve_app.platform import kernel_file_prefix  # noqa: E402  (after the path, run as a script)

SLICES = range(1, 9)  # vLLM's LoRA layers have 1 to n slices; its lookup by slice count has no fallback

BATCHES = [1, 8, 16, 32, 64, 128, 256, 512, 2048, 8192]
COMMON = {"num_ctas": 1, "max_nreg": None}


def module_shapes(config: dict, tp: int) -> dict[str, tuple[int, list[int]]]:
    """module -> (input width K of the shrink, output width of each slice of the expand), per TP rank."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    q, kvw = heads * head_dim // tp, max(kv // tp, 1) * head_dim
    return {  # column-parallel modules keep the full input and split outputs; row-parallel the opposite
        "qkv": (hidden, [q, kvw, kvw]),
        "o": (heads * head_dim // tp, [hidden]),
        "gate_up": (hidden, [inter // tp, inter // tp]),
        "down": (inter // tp, [hidden]),
    }


def default_config(op: str, batch: int, slices: int) -> dict:
    """vLLM 0.25.1's defaults (vllm/lora/ops/triton_ops/utils.py), the baseline of every ratio."""
    if op == "shrink":
        small = batch < 128
        return {
            "block_m": 32,
            "block_n": 16,
            "block_k": 256 if small else 32,
            "split_k": 64 if small else 8,
            "num_warps": 4,
            "num_stages": 2,
            "group_size_m": 8,
            **COMMON,
        }
    return {
        "block_m": 64,
        "block_n": 64 if slices > 1 else 128,
        "block_k": 32,
        "num_warps": 4,
        "num_stages": 2,
        **COMMON,
    }


def candidates(op: str, k: int, rank: int, batch: int) -> list[dict]:
    """A small search space (each candidate costs a Triton compile): shrink K-splits that each have
    work, one to four K-blocks per split, 16- or 32-row blocks for decode; expand row and column blocks."""
    pow2 = max(16, 1 << (rank - 1).bit_length())
    if op == "shrink":
        if batch >= 128:
            tiles = itertools.product([32, 64], [32, 64], [1, 2, 4, 8, 16])
        else:
            tiles = [
                (bm, bk, k // (bk * blocks))
                for bm, bk, blocks in itertools.product([16, 32], [32, 64, 128, 256], [1, 2, 4])
                if k % (bk * blocks) == 0
            ] + [(bm, 64, 1) for bm in (16, 32)]
        return [
            {
                "block_m": bm,
                "block_n": pow2,
                "block_k": bk,
                "split_k": sk,
                "num_warps": 4,
                "num_stages": 2,
                "group_size_m": 8,
                **COMMON,
            }
            for bm, bk, sk in tiles
            if sk >= 1
        ]
    return [
        {"block_m": bm, "block_n": bn, "block_k": pow2, "num_warps": 4, "num_stages": 2, **COMMON}
        for bm, bn in itertools.product([16, 32, 64], [32, 64, 128, 256])
    ]


def wide_candidates(op: str, k: int, rank: int, batch: int) -> list[dict]:
    """`--wide`: for decode batches, also fewer or more warps and other pipeline depths. With one
    token per adapter each program has a 16-row tile with one live row; fewer warps may waste less."""
    found = candidates(op, k, rank, batch)
    if batch >= 128:
        return found
    if op == "expand":
        tiles = [dict(found[0], block_m=16, block_n=bn) for bn in (64, 128, 256, 512)]
        variants = itertools.product(tiles, [1, 2, 4, 8], [1, 2])
    else:
        variants = itertools.product(found, [2], [2])
    extra = [dict(c, num_warps=w, num_stages=st) for c, w, st in variants]
    return found + [c for c in extra if c not in found]


class Case:
    """One kernel call's tensors: `batch` tokens spread over `distinct` adapters of `max_loras` slots."""

    def __init__(self, op: str, k: int, widths: list[int], rank: int, batch: int, distinct: int, max_loras: int):
        import torch
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

        dev, bf16 = "cuda", torch.bfloat16
        self.op = op
        slices = len(widths)
        self.meta = LoRAKernelMeta.make(max_loras, batch, dev)
        slots = torch.randperm(max_loras)[:distinct]
        self.meta.prepare_tensors(slots[torch.arange(batch) % distinct].to(torch.int32).to(dev))
        if op == "shrink":
            self.x = torch.randn(batch, k, dtype=bf16, device=dev)
            self.w = [torch.randn(max_loras, 1, rank, k, dtype=bf16, device=dev) * 0.02 for _ in range(slices)]
            self.y = torch.zeros(slices, batch, rank, dtype=torch.float32, device=dev)
        else:
            self.x = torch.randn(slices, batch, rank, dtype=torch.float32, device=dev)
            self.w = [torch.randn(max_loras, 1, n, rank, dtype=bf16, device=dev) * 0.02 for n in widths]
            self.y = torch.zeros(batch, sum(widths), dtype=bf16, device=dev)
        self.batch = batch

    def __call__(self) -> None:
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

        meta = self.meta.meta_args(self.batch, False)
        if self.op == "shrink":
            lora_shrink_op._lora_shrink(self.x, self.w, self.y, *meta, 1.0)
        else:
            # adds into its output (timed calls accumulate; output() starts from zeros)
            lora_expand_op._lora_expand(self.x, self.w, self.y, *meta, offset_start=0, add_inputs=True)


def use(config: dict) -> None:
    """Make vLLM's kernel wrappers take `config` (they look the name up at each call)."""
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

    lora_shrink_op.get_lora_op_configs = lora_expand_op.get_lora_op_configs = lambda *a, **kw: config


def gpu_us(case: Case, calls: int = 20, reps: int = 3) -> float:
    """Microseconds per call, replayed from a CUDA graph as the engine's decode steps are."""
    import torch

    case()  # compiles this config and fills vLLM's pointer caches outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            case()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def distincts(batch: int, max_loras: int) -> list[int]:
    if batch > 512:  # prefill chunks: a few requests
        return sorted({1, min(8, max_loras)})
    return sorted({1, min(batch, 8, max_loras), min(batch, max_loras)})


def output(case: Case, config: dict):
    use(config)
    case.y.zero_()
    case()
    return case.y.float().clone()


def tune_shape(op, k, widths, rank, max_loras, batch, wide: bool = False) -> dict:
    """The best config for one (op, shape, batch), with its times and the default's."""
    from vllm.lora.ops.triton_ops import utils

    # vLLM caches weight pointers and strides by data pointer (its weights never move); ours are
    # freed between shapes, and a new tensor at an old address must not get the old strides.
    utils._LORA_A_PTR_DICT.clear()
    utils._LORA_B_PTR_DICT.clear()
    slices = len(widths)
    cases = [Case(op, k, widths, rank, batch, d, max_loras) for d in distincts(batch, max_loras)]
    default = default_config(op, batch, slices)
    use(default)
    base = [gpu_us(c) for c in cases]
    best, best_score, best_us = default, 1.0, base
    for config in (wide_candidates if wide else candidates)(op, k, rank, batch):
        use(config)
        try:
            times = [gpu_us(c) for c in cases]
        except Exception as e:  # a config Triton cannot build for this shape (e.g. shared memory)
            print(f"  skip {config}: {type(e).__name__}", flush=True)
            continue
        score = sum(t / b for t, b in zip(times, base)) / len(base)
        if score < best_score:
            best, best_score, best_us = config, score, times
    if best is not default:
        want, got = output(cases[-1], default), output(cases[-1], best)
        scale = want.abs().max().item() or 1.0
        error = (want - got).abs().max().item() / scale
        if error > 2e-2:
            print(f"  {op} b={batch}: best config differs from the default by {error:.3g}; keeping the default")
            best, best_score, best_us = default, 1.0, base
    return {
        "config": best,
        "distinct": distincts(batch, max_loras),
        "default_us": base,
        "tuned_us": best_us,
        "mean_ratio": round(best_score, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder of the config files; what is there is kept")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--max-loras", type=int, nargs="+", default=[64])
    parser.add_argument("--modules", nargs="+", default=["qkv"], choices=["qkv", "o", "gate_up", "down"])
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--wide", action="store_true", help="decode batches: also 1-8 warps (expand), 1-2 stages")
    parser.add_argument("--rebuild", metavar="GPU_NAME", help="only rewrite the files from --out's tune_report.json")
    args = parser.parse_args()
    shapes = module_shapes(json.loads((args.model_dir / "config.json").read_text()), args.tp)
    if args.rebuild:
        ConfigFiles(args.out, args.rebuild, shapes).write()
        return
    import torch

    files = ConfigFiles(args.out, torch.cuda.get_device_name(), shapes)
    with torch.inference_mode():  # as in the engine; vLLM's kernel wrappers run in it too
        tune_all(args, shapes, files)
    print(step_table(files.report))


def tune_all(args, shapes: dict, files: ConfigFiles) -> None:
    started = time.time()
    for max_loras, module, rank, op, batch in itertools.product(
        args.max_loras, args.modules, args.ranks, ["shrink", "expand"], args.batches
    ):
        k, widths = shapes[module]
        result = tune_shape(op, k, widths, rank, max_loras, batch, args.wide)
        shape = {"k": k, "widths": widths, "tp": args.tp}
        files.report.append(
            {"max_loras": max_loras, "module": module, "rank": rank, "op": op, "batch": batch, **shape, **result}
        )
        # Written after every shape, so a run cut short keeps what it found.
        files.write()
        print(
            f"[{time.time() - started:5.0f}s] {module} r{rank} {op} b={batch} slots={max_loras}: "
            f"default {_us(result['default_us'])} -> {_us(result['tuned_us'])} us "
            f"(d={result['distinct']}) {_short(result['config'])}",
            flush=True,
        )


class ConfigFiles:
    """vLLM's tuned-config files for one GPU, nested config[max_loras + 1][num_slices][m][k][n]
    (max_loras counts vLLM's id list, one longer than the slots; k, n are the GEMM's sides).
    The folder's tune_report.json is the record: the files are rebuilt from it at every write, so
    runs for other modules or ranks add to one set of files, and a later run of a shape wins."""

    def __init__(self, folder: Path, gpu_name: str, shapes: dict):
        self.folder, self.shapes = folder, shapes
        self.paths = {
            "shrink": [folder / f"{kernel_file_prefix(gpu_name)}_SHRINK.json"],
            # the FALSE file serves vLLM's dual-stream path: same shapes, same configs
            "expand": [folder / f"{kernel_file_prefix(gpu_name)}_EXPAND_{a}.json" for a in ("TRUE", "FALSE")],
        }
        self.report = _read(folder / "tune_report.json") or []

    def trees(self) -> dict[str, dict]:
        trees: dict[str, dict] = {"shrink": {}, "expand": {}}
        for r in self.report:
            k, widths = (r["k"], r["widths"]) if "k" in r else self.shapes[r["module"]]  # (older reports)
            _put(trees[r["op"]], r["op"], r["max_loras"], k, widths, r["rank"], r["batch"], r["config"])
        # vLLM looks a shape up by num_slices with no nearest-key fallback: a slice count that was
        # never tuned (another model's layers, say 4 slices) gets vLLM's defaults, so that the lookup
        # finds it; within it, the nearest batch, k and n apply.
        ranks = sorted({r["rank"] for r in self.report})
        k = min(r["k"] if "k" in r else self.shapes[r["module"]][0] for r in self.report)
        for op, tree in trees.items():
            tuned = {(slots, slices) for slots, branch in tree.items() for slices in branch}
            for slots, slices, rank, batch in itertools.product(list(tree), SLICES, ranks, BATCHES):
                if (slots, str(slices)) not in tuned:
                    _put(tree, op, int(slots) - 1, k, [k] * slices, rank, batch, default_config(op, batch, slices))
        return trees

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for op, tree in self.trees().items():
            for path in self.paths[op]:
                path.write_text(json.dumps(tree, indent=1))
        (self.folder / "tune_report.json").write_text(json.dumps(self.report, indent=1))


def _put(tree: dict, op: str, max_loras: int, k: int, widths: list[int], rank: int, batch: int, config: dict) -> None:
    key_k, key_n = (k, rank) if op == "shrink" else (rank, max(widths))
    for key in (max_loras + 1, len(widths), batch, key_k):
        tree = tree.setdefault(str(key), {})
    tree[str(key_n)] = config


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else {}


def _us(times: list[float]) -> str:
    return "/".join(f"{t:.1f}" for t in times)


def _short(config: dict) -> str:
    keys = ["block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages"]
    return " ".join(f"{k.replace('block_', 'b')}={config[k]}" for k in keys if k in config)


def step_table(report: list[dict]) -> str:
    """Shrink + expand per module at each batch and distinct-adapter count, default vs tuned (us)."""
    rows = [
        "| slots | module | rank | batch | distinct adapters | default us | tuned us | ratio |",
        "|---" * 8 + "|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in report:
        groups.setdefault((r["max_loras"], r["module"], r["rank"], r["batch"]), []).append(r)
    for (slots, module, rank, batch), ops in groups.items():
        for i, d in enumerate(ops[0]["distinct"]):
            base = sum(o["default_us"][i] for o in ops)
            tuned = sum(o["tuned_us"][i] for o in ops)
            rows.append(
                f"| {slots} | {module} | {rank} | {batch} | {d} | {base:.1f} | {tuned:.1f} | {tuned / base:.2f} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
