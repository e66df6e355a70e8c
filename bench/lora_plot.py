"""One picture of multi-LoRA runs from bench/side_by_side.py: per workload and system, the base rate,
the rate over many adapters, and LoRA / base (issue 22's measure), from the runs' summary.json files.

    python bench/lora_plot.py OUT.png "LABEL=SUMMARY.json:SYSTEM" ...
    G=docs/gpu; python bench/lora_plot.py docs/lora_gpu_h200.png \\
      "64 uniform|vLLM, defaults (1 slot; 1 round)=$G/lora-64-vllm-defaults-2026-11-30/summary.json:vllm" \\
      "64 uniform|vLLM, expert flags=$G/lora-64-spread-2026-11-30/vllm/summary.json:vllm" \\
      "64 uniform|lorafleet deploy, defaults=$G/lora-64-spread-2026-11-30/lorafleet-deploy/summary.json:lorafleet-deploy" \\
      "64 uniform|lorafleet deploy, vLLM's kernel configs=$G/lora-64-spread-2026-11-30/lorafleet-deploy-vllm-default-kernels/summary.json:lorafleet-deploy" \\
      "Zipf 256|vLLM, expert flags=$G/lora-zipf256-pair-2026-11-30/summary.json:vllm" \\
      "Zipf 256|lorafleet deploy, defaults=$G/lora-zipf256-pair-2026-11-30/summary.json:lorafleet-deploy"

(matplotlib is not one of the project's packages: `pip install matplotlib` first.)

LABEL groups bars (a workload); SYSTEM is a key of the summary's lora_runs (vllm, lorafleet-deploy).
"LABEL=SUMMARY.json:SYSTEM:WORKLOAD" takes one of a start's --lora-workloads (the summary's
lora_matrix; WORKLOAD as the table prints it, e.g. "uniform over 32 @ 64 streams").
A label may carry a system's description after '|': "64 uniform|vLLM, expert flags=...".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read(spec: str) -> tuple[str, str, float, float]:
    """(workload, system name, base tok/s, LoRA tok/s) of one run."""
    label, source = spec.split("=", 1)
    path, rest = source.split(".json:", 1)
    system, _, matrix_label = rest.partition(":")
    summary = json.loads(Path(path + ".json").read_text())
    lora = summary["lora_matrix"][system][matrix_label] if matrix_label else summary["lora_runs"][system]
    concurrency = lora["max_concurrency"]
    [base] = [r for r in summary["runs"] if r["system"] == system and r["concurrency"] == concurrency]
    workload, _, name = label.partition("|")
    return workload, name or system, base["output_throughput"], lora["output_throughput"]


def plot(out: Path, runs: list[tuple[str, str, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r[0] for r in runs))
    systems = list(dict.fromkeys(r[1] for r in runs))
    width = 0.8 / max(sum(r[0] == w for r in runs) for w in workloads)
    fig, ax = plt.subplots(figsize=(2.6 * len(workloads) + 3, 5))
    for workload, system, base, lora in runs:
        here = [r[1] for r in runs if r[0] == workload]  # bars centred on their workload
        x = workloads.index(workload) + (here.index(system) - (len(here) - 1) / 2) * width
        k = systems.index(system)  # one colour per system
        first = next(r for r in runs if r[1] == system)[0] == workload  # (one legend entry per system)
        ax.bar(x, base, width, color=f"C{k}", alpha=0.25)
        ax.bar(x, lora, width, color=f"C{k}", label=system if first else None)
        ax.text(x, lora, f"{lora / base:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("output tok/s")
    ax.set_title("pale: base model; solid: many adapters; label: LoRA / base", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    runs = [read(spec) for spec in specs]
    for workload, system, base, lora in runs:
        print(f"{workload:>24} | {system:<40} | base {base:7.0f} | LoRA {lora:7.0f} | {lora / base:.2f}x")
    plot(out, runs)


if __name__ == "__main__":
    main()
