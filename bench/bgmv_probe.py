"""What a one-program-per-token LoRA decode kernel (BGMV, as Punica and S-LoRA have) would cost
against vLLM's shrink and expand with lorafleet's tuned configs: the evidence for issue 22's open
decision (a kernel behind a vLLM platform plugin, which is not public API). A probe, not product code.

    python bench/bgmv_probe.py MODEL_DIR [--batch 64] [--rank 8] [--out probe.json]   # on a GPU
    TRITON_INTERPRET=1 python bench/bgmv_probe.py MODEL_DIR --device cpu --batch 4   # correctness only

vLLM's kernels give each adapter a tile of 16-32 rows: at decode, one row of it is live, and their
cost grows with the distinct adapters in the batch (docs/benchmarks.md: 15 us per q/k/v layer with one
adapter among 64 tokens, 69 us with 64). Here each program takes one token: the shrink reads its
adapter's A (rank x K) once, the expand one column block of its B, so the work is the weights' bytes,
about the same for any number of distinct adapters. Both kernels are checked against torch first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.lora_kernel_tune import Case, gpu_us, module_shapes  # noqa: E402  (after the path, run as a script)


@triton.jit
def _shrink(
    x_ptr, a_ptr, y_ptr, lora_ptr, K, s_xt, s_as, s_al, s_ar, s_ys, s_yt, R: tl.constexpr, BLOCK_K: tl.constexpr
):
    """y[slice, token, :] = A[slice, lora(token)] @ x[token]: one program per (token, slice)."""
    t, s = tl.program_id(0), tl.program_id(1)
    lora = tl.load(lora_ptr + t)
    if lora >= 0:
        r = tl.arange(0, R)
        acc = tl.zeros((R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            inside = k < K
            x = tl.load(x_ptr + t * s_xt + k, mask=inside, other=0.0).to(tl.float32)
            a = tl.load(
                a_ptr + s * s_as + lora * s_al + r[:, None] * s_ar + k[None, :], mask=inside[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(y_ptr + s * s_ys + t * s_yt + r, acc)


@triton.jit
def _expand(
    y_ptr, b_ptr, out_ptr, lora_ptr, N, END0, END1, s_ys, s_yt, s_bl, s_bn, s_ot, R: tl.constexpr, BLOCK_N: tl.constexpr
):
    """out[token, n] += B[lora(token), n] . y[slice(n), token]: one program per (token, column
    block); B is the slices' B matrices side by side (slice 0 ends at END0, slice 1 at END1)."""
    t, block = tl.program_id(0), tl.program_id(1)
    lora = tl.load(lora_ptr + t)
    if lora >= 0:
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = n < N
        s = (n >= END0).to(tl.int32) + (n >= END1).to(tl.int32)
        r = tl.arange(0, R)
        y = tl.load(y_ptr + s[:, None] * s_ys + t * s_yt + r[None, :], mask=inside[:, None], other=0.0)
        b = tl.load(b_ptr + lora * s_bl + n[:, None] * s_bn + r[None, :], mask=inside[:, None], other=0.0)
        add = tl.sum(b.to(tl.float32) * y, axis=1)
        old = tl.load(out_ptr + t * s_ot + n, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * s_ot + n, (old + add).to(out_ptr.dtype.element_ty), mask=inside)


class Bgmv:
    """One q/k/v LoRA application for `batch` tokens, adapter ids `lora` (-1: none)."""

    def __init__(self, k: int, widths: list[int], rank: int, max_loras: int, lora: torch.Tensor, device: str):
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.k, self.widths, self.rank, self.lora = k, widths, rank, lora.to(torch.int32).to(device)
        batch, slices = len(lora), len(widths)
        self.x = torch.randn(batch, k, dtype=dtype, device=device)
        self.a = torch.randn(slices, max_loras, rank, k, dtype=dtype, device=device) * 0.02
        self.b = torch.randn(max_loras, sum(widths), rank, dtype=dtype, device=device) * 0.02
        self.y = torch.zeros(slices, batch, rank, dtype=torch.float32, device=device)
        self.out = torch.zeros(batch, sum(widths), dtype=dtype, device=device)
        self.ends = [sum(widths[: i + 1]) for i in range(slices)] + [sum(widths)] * (3 - slices)

    def __call__(self, block_k: int = 256, block_n: int = 128, warps: int = 4) -> None:
        batch, slices = len(self.lora), len(self.widths)
        x, a, y, b, out = self.x, self.a, self.y, self.b, self.out
        _shrink[(batch, slices)](
            x, a, y, self.lora, self.k, x.stride(0), a.stride(0), a.stride(1), a.stride(2), y.stride(0), y.stride(1),
            R=self.rank, BLOCK_K=block_k, num_warps=warps,
        )  # fmt: skip
        _expand[(batch, triton.cdiv(out.shape[1], block_n))](
            y, b, out, self.lora, out.shape[1], self.ends[0], self.ends[1], y.stride(0), y.stride(1), b.stride(0),
            b.stride(1), out.stride(0), R=self.rank, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's y (shrink) and out (expand, from zeros) for the same inputs."""
        used = self.lora >= 0
        ids = self.lora.clamp(min=0).long()
        y = torch.einsum("sbrk,bk->sbr", self.a[:, ids].float(), self.x.float()) * used[None, :, None]
        s_of_n = torch.bucketize(
            torch.arange(self.out.shape[1], device=self.x.device),
            torch.tensor(self.ends[:2], device=self.x.device),
            right=True,
        )
        per_col = y[s_of_n]  # (n, batch, rank)
        out = torch.einsum("bnr,nbr->bn", self.b[ids].float(), per_col) * used[:, None]
        return y, out


def check(case: Bgmv) -> float:
    """The largest relative difference of the kernels' results from torch's."""
    case.y.zero_()
    case.out.zero_()
    case()
    want_y, want_out = case.reference()
    scale = max(want_out.abs().max().item(), 1e-6)
    y_err = (case.y - want_y).abs().max().item() / max(want_y.abs().max().item(), 1e-6)
    return max(y_err, (case.out.float() - want_out).abs().max().item() / scale)


def vllm_us(k: int, widths: list[int], rank: int, batch: int, distinct: int, max_loras: int) -> float:
    """vLLM's shrink + expand for the same shapes, with the configs vLLM picks (lorafleet's tuned
    files when VLLM_TUNED_CONFIG_FOLDER points at them, as the engine replicas set it)."""
    shrink = Case("shrink", k, widths, rank, batch, distinct, max_loras)
    expand = Case("expand", k, widths, rank, batch, distinct, max_loras)
    return gpu_us(shrink) + gpu_us(expand)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--wide", action="store_true", help="48 block and warp choices instead of 8")
    args = parser.parse_args()
    k, widths = module_shapes(json.loads((args.model_dir / "config.json").read_text()), 1)["qkv"]
    rows = []
    for distinct in sorted({1, min(8, args.batch), min(args.batch, args.max_loras)}):
        slots = torch.randperm(args.max_loras)[:distinct]
        lora = slots[torch.arange(args.batch) % distinct]
        case = Bgmv(k, widths, args.rank, args.max_loras, lora, args.device)
        row = {"distinct": distinct, "max_rel_error": check(case)}
        if args.device == "cuda":
            row["bgmv_us"] = {
                f"k{bk}-n{bn}-w{w}": gpu_us(lambda bk=bk, bn=bn, w=w, case=case: case(bk, bn, w))
                for bk in ((128, 256, 512, 1024) if args.wide else (128, 256))
                for bn in ((64, 128, 256, 512) if args.wide else (128, 256))
                for w in ((2, 4, 8) if args.wide else (2, 4))
            }
            row["vllm_us"] = vllm_us(k, widths, args.rank, args.batch, distinct, args.max_loras)
        rows.append(row)
        best = min(row.get("bgmv_us", {"-": float("nan")}).items(), key=lambda kv: kv[1])
        print(
            f"d={distinct}: max relative error {row['max_rel_error']:.2e}; BGMV best {best[1]:.1f} us ({best[0]}); "
            f"vLLM {row.get('vllm_us', float('nan')):.1f} us  (q/k/v layer, batch {args.batch}, rank {args.rank})",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps({"batch": args.batch, "rank": args.rank, "k": k, "widths": widths, "rows": rows})
        )


if __name__ == "__main__":
    main()
