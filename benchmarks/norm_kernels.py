"""Dropout + residual add + LayerNorm, forward and backward, on a BERT-base training batch.

Every BERT sublayer ends in ``LayerNorm(dropout(dense_out) + residual)``: 24 per biencoder
encoder pass. In the compiled H200 biencoder step this was 8% of the time (221 us per forward
call, ~60 us of memory traffic), Philox-bound. Per implementation, one call's forward and
forward + backward time, the effective bandwidth (bytes the kernel must move / time), and at
dropout 0 the largest difference from eager torch:

- ``eager``: ``F.layer_norm(F.dropout(x) + r)``, torch's kernels;
- ``compiled``: the same through ``torch.compile`` (inductor's fused kernels, what
  ``torch_compile: true`` trains with);
- ``fused``: ``simlm_core.modeling.fused_norm`` (our Triton kernel; CUDA, or ``TRITON_INTERPRET=1``).

x is the sublayer output in bf16 and the residual stream fp32, as under bf16 autocast.

    python benchmarks/norm_kernels.py [--device cuda] [--rows 36864] [--hidden 768]

Writes ``benchmarks/results/norm_kernels-<device>.json``. On CPU: eager and compiled only (a smoke test).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model_throughput import resolve, sync  # noqa: E402
from simlm_core.modeling.fused_norm import dropout_add_layer_norm, fused_norm_available  # noqa: E402


def time_it(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    """Mean seconds per call over ``repeats`` calls (after two warm-up calls)."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def torch_ops(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    return F.layer_norm(F.dropout(x, p, True) + r, (x.shape[-1],), w, b, 1e-12)


def fused(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    return dropout_add_layer_norm(x, r, w, b, 1e-12, p, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rows", type=int, default=None, help="tokens (cuda 36,864 = 256 passages x 144; cpu 4,096)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (cuda 50, cpu 5)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = resolve(args.device)
    gpu = device.type == "cuda"
    rows_n, hidden = args.rows or (36_864 if gpu else 4_096), args.hidden
    repeats = args.repeats or (50 if gpu else 5)
    info = C.machine_info(device.type)
    print(f"machine: {C.machine_line(info)}\ndevice {device}, torch {torch.__version__}, "
          f"fused kernel {'yes' if fused_norm_available(device) else 'no'}; {rows_n:,} rows x {hidden}")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows_n, hidden, device=device, generator=g, dtype=torch.bfloat16 if gpu else torch.float32)
    r = torch.randn(rows_n, hidden, device=device, generator=g)
    w = 1 + 0.1 * torch.randn(hidden, device=device, generator=g)
    b = 0.1 * torch.randn(hidden, device=device, generator=g)
    grad = torch.randn(rows_n, hidden, device=device, generator=g)
    # Bytes that must move: forward reads x, r and writes y (fp32); backward reads dy, x, r and
    # writes dx, dr (the weight/bias partial sums are small).
    xb, rb = x.element_size(), r.element_size()
    fwd_bytes = rows_n * hidden * (xb + rb + 4)
    bwd_bytes = rows_n * hidden * (4 + xb + rb + xb + rb)
    methods: dict[str, Callable] = {"eager": torch_ops, "compiled": torch.compile(torch_ops, dynamic=False)}
    if fused_norm_available(device):
        methods["fused"] = fused
    results, reference = [], None
    for name, fn in methods.items():
        try:
            with torch.no_grad():
                y0 = fn(x, r, w, b, 0.0).float()
            reference = y0 if reference is None else reference
            err = float((y0 - reference).abs().max())
            for p in (0.1, 0.0):
                with torch.no_grad():
                    fwd = time_it(device, lambda: fn(x, r, w, b, p), repeats)
                xs, rs, ws, bs = (t.detach().requires_grad_() for t in (x, r, w, b))

                def both() -> None:
                    # autograd.grad, not .backward(): accumulating into the leaves' .grad added two
                    # full-size read-modify-writes per call (x and the fp32 residual), the same for
                    # every method, which a training step (non-leaf inputs) never does.
                    torch.autograd.grad(fn(xs, rs, ws, bs, p), (xs, rs, ws, bs), grad)

                total = time_it(device, both, repeats)
                row = {"method": name, "dropout": p, "forward_us": fwd * 1e6, "forward_backward_us": total * 1e6,
                       "forward_gb_per_s": fwd_bytes / fwd / 1e9,
                       "backward_gb_per_s": bwd_bytes / max(total - fwd, 1e-9) / 1e9,
                       "max_abs_diff_vs_eager_p0": err}
                results.append(row)
                print(f"   {name:9s} dropout {p}: forward {fwd * 1e6:8.1f} us ({row['forward_gb_per_s']:6.0f} GB/s), "
                      f"forward+backward {total * 1e6:8.1f} us; |y - eager| at p=0: {err:.1e}", flush=True)
        except Exception as exc:  # a method that cannot run here: say why, keep the others
            print(f"   {name}: FAILED {str(exc).splitlines()[0][:200]}", flush=True)
    best = {m: min((r["forward_backward_us"] for r in results if r["method"] == m and r["dropout"] == 0.1),
                   default=math.nan) for m in methods}
    if "fused" in best and "compiled" in best:
        print(f"fused vs compiled, dropout 0.1, forward+backward: {best['compiled'] / best['fused']:.2f}x; "
              f"x 24 calls per encoder pass saves {24 * (best['compiled'] - best['fused']) / 1e3:.2f} ms")
    payload = {"benchmark": "norm_kernels", "date": C.now_iso(), "machine": info, "device": str(device),
               "rows": rows_n, "hidden": hidden, "x_dtype": str(x.dtype), "residual_dtype": str(r.dtype),
               "results": results}
    path = C.write_results("norm_kernels", device.type, payload, Path(args.out) if args.out else None)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
