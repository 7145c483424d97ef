"""Compile our Triton kernels for a GPU without one: registers, spills, shared memory, occupancy.

Triton's wheel carries the NVIDIA backend and ``ptxas``, so each kernel can be compiled ahead of
time for an architecture (default sm_90, the H100/H200) on any machine. Per kernel and tile
configuration this prints what ``ptxas -v`` reports -- registers per thread, spilled bytes --
the shared memory the kernel asks for, and how many programs fit on one SM by registers and by
shared memory: the figures that decide whether a tiling can run fast, before a GPU is lent.

    python benchmarks/triton_compile.py [--arch 90] [--kernels attention_train_bwd,...] [--quick]

Arguments are compiled with the alignment a real call gives (pointers and strides divisible by
16, as torch allocates), which is what lets Triton vectorise loads. Writes
``benchmarks/results/triton_compile-sm<arch>.json``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# Per-SM limits by compute capability: (32-bit registers, shared memory bytes, resident threads).
SM_LIMITS = {80: (65536, 164 * 1024, 2048), 86: (65536, 100 * 1024, 1536), 89: (65536, 100 * 1024, 1536),
             90: (65536, 228 * 1024, 2048)}
def quick_configs() -> dict[str, list[dict]]:
    """The tiling each kernel runs with in the library (its defaults)."""
    from simlm_core.modeling.attention_train import TRAIN_BACKWARD_BLOCKS, TRAIN_BLOCKS
    from simlm_core.modeling.fused_norm import _warps
    from simlm_core.modeling.packed_attention import DEFAULT_BLOCKS

    m, n, heads, warps = DEFAULT_BLOCKS
    return {
        "packed_attention_fwd": [dict(BLOCK_M=m, BLOCK_N=n, HEADS=heads, num_warps=warps)],
        "attention_train_fwd": [dict(BLOCK_M=TRAIN_BLOCKS[0], BLOCK_N=TRAIN_BLOCKS[1], num_warps=TRAIN_BLOCKS[2])],
        "attention_train_bwd": [dict(BLOCK_M=TRAIN_BACKWARD_BLOCKS[0], BLOCK_N=TRAIN_BACKWARD_BLOCKS[1],
                                     num_warps=TRAIN_BACKWARD_BLOCKS[2])],
        "dropout_add_layer_norm_fwd": [dict(num_warps=_warps(768))],
        "dropout_add_layer_norm_bwd": [dict(num_warps=_warps(768))],
    }


SWEEP = {
    "packed_attention_fwd": [dict(BLOCK_M=m, BLOCK_N=n, HEADS=1, num_warps=w)
                             for m, n, w in [(64, 32, 4), (64, 64, 4), (32, 32, 4), (128, 64, 8)]],
    "attention_train_fwd": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w)
                            for m, n, w in [(64, 32, 4), (64, 64, 4), (32, 32, 4), (32, 64, 4), (64, 32, 8),
                                            (128, 32, 8), (128, 64, 8)]],
    "attention_train_bwd": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w)
                            for m, n, w in [(64, 32, 4), (64, 64, 4), (32, 32, 4), (32, 64, 4), (64, 32, 8),
                                            (128, 32, 8), (128, 64, 8), (16, 32, 4), (32, 16, 4)]],
    "dropout_add_layer_norm_fwd": [dict(num_warps=w) for w in (2, 4, 8)],
    "dropout_add_layer_norm_bwd": [dict(num_warps=w) for w in (2, 4, 8)],
}


def kernel_specs(hidden: int, head_dim: int) -> dict[str, tuple[Any, list[tuple[str, str]], dict]]:
    """Per kernel: (jitted function, [(argument, Triton type)], fixed constexprs), as the library calls it
    under bf16 autocast (sublayer outputs and q/k/v bf16, the residual stream and statistics fp32)."""
    from simlm_core.modeling import _attention_kernels as A
    from simlm_core.modeling import _fused_norm_kernels as N
    from simlm_core.modeling.fused_norm import _groups

    strides = lambda names: [(n, "i32") for n in names.split()]  # noqa: E731
    qkvo = [("Q", "*bf16"), ("K", "*bf16"), ("V", "*bf16")]
    bounds = [("q_starts", "*i32"), ("q_lens", "*i32"), ("k_starts", "*i32"), ("k_lens", "*i32")]
    return {
        "packed_attention_fwd": (A.packed_attention_fwd, qkvo + [("O", "*bf16"), ("cu_q", "*i32"), ("cu_k", "*i32"),
                                                    ("qk_scale", "fp32")]
                                 + strides("stride_qt stride_qh stride_kt stride_kh stride_vt stride_vh stride_ot stride_oh"),
                                 dict(D=head_dim, WIDE=False)),
        "attention_train_fwd": (A.attention_train_fwd, qkvo + [
            ("O", "*bf16"), ("LSE", "*fp32"), *bounds, ("SEED", "*i64"),
            ("qk_scale", "fp32"), ("threshold", "i32"), ("drop_scale", "fp32")]
            + strides("stride_qt stride_qh stride_kt stride_kh stride_vt stride_vh stride_ot stride_oh stride_lt"),
            dict(D=head_dim, DROPOUT=True)),
        "attention_train_bwd": (A.attention_train_bwd, qkvo + [
            ("DO", "*bf16"), ("LSE", "*fp32"), ("DELTA", "*fp32"), ("DQ", "*fp32"), ("DK", "*bf16"), ("DV", "*bf16"),
            *bounds, ("SEED", "*i64"), ("qk_scale", "fp32"), ("sm_scale", "fp32"),
            ("threshold", "i32"), ("drop_scale", "fp32")]
            + strides("stride_qt stride_qh stride_kt stride_kh stride_vt stride_vh stride_dot stride_doh stride_lt "
                      "stride_dqt stride_dqh stride_dkt stride_dkh"),
            dict(D=head_dim, DROPOUT=True)),
        "dropout_add_layer_norm_fwd": (N.dropout_add_layer_norm_fwd, [
            ("X", "*bf16"), ("R", "*fp32"), ("W", "*fp32"), ("B", "*fp32"), ("Y", "*fp32"), ("SEED", "*i64"),
            ("H", "i32"), ("eps", "fp32"), ("threshold", "i32"), ("scale", "fp32")],
            dict(G=_groups(hidden), DROPOUT=True)),
        "dropout_add_layer_norm_bwd": (N.dropout_add_layer_norm_bwd, [
            ("DY", "*fp32"), ("X", "*bf16"), ("R", "*fp32"), ("W", "*fp32"), ("SEED", "*i64"), ("DX", "*bf16"),
            ("DR", "*fp32"), ("DW_PART", "*fp32"), ("DB_PART", "*fp32"), ("T", "i32"), ("H", "i32"), ("eps", "fp32"),
            ("threshold", "i32"), ("scale", "fp32"), ("rows_per_program", "i32")],
            dict(G=_groups(hidden), DROPOUT=True)),
    }


def compile_one(fn: Any, args: list[tuple[str, str]], constexprs: dict, arch: int, num_warps: int) -> dict:
    """Compile for ``sm_<arch>``; registers and spills from ptxas -v, shared memory from Triton."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvidia
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature = {n: t for n, t in args} | {n: "constexpr" for n in constexprs}
    if sorted(signature) != sorted(names):
        raise ValueError(f"the spec's arguments {sorted(signature)} are not the kernel's {sorted(names)}")
    # What torch's allocations give a real call: 16-byte-aligned pointers, strides and sizes
    # divisible by 16 (Triton specialises on it and vectorises loads).
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in args
               if t.startswith("*") or n.startswith("stride") or n == "H"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    compile_s = time.perf_counter() - t0
    ptxas = nvidia.get_ptxas(arch).path
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "k.ptx").write_text(kernel.asm["ptx"])
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                             capture_output=True, text=True, check=True)
    report = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"registers": regs, "spill_store_bytes": int(spill.group(1)) if spill else 0,
            "spill_load_bytes": int(spill.group(2)) if spill else 0, "shared_bytes": int(kernel.metadata.shared),
            "num_warps": num_warps, "compile_seconds": compile_s}


def occupancy(row: dict, arch: int) -> int:
    """Programs resident per SM, by registers, shared memory and threads (the smallest)."""
    regs, smem, threads = SM_LIMITS.get(arch, SM_LIMITS[90])
    per_thread = -(-row["registers"] // 8) * 8  # allocated in units of 8 per thread (256 per warp)
    by_regs = regs // (per_thread * 32 * row["num_warps"])
    by_smem = smem // row["shared_bytes"] if row["shared_bytes"] else 32
    return max(0, min(by_regs, by_smem, threads // (32 * row["num_warps"]), 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--kernels", default=None, help="comma list (default: all)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="the library's default tiling of each kernel only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    specs = kernel_specs(args.hidden, args.head_dim)
    wanted = args.kernels.split(",") if args.kernels else list(specs)
    configs = quick_configs() if args.quick else SWEEP
    rows, failures = [], {}
    print(f"sm_{args.arch}, hidden {args.hidden}, head dim {args.head_dim}")
    for name in wanted:
        fn, sig, fixed = specs[name]
        for cfg in configs[name]:
            cfg = dict(cfg)
            warps = cfg.pop("num_warps")
            label = f"{name} " + ",".join(f"{k}={v}" for k, v in cfg.items()) + f" warps={warps}"
            try:
                row = compile_one(fn, sig, {**fixed, **cfg}, args.arch, warps)
            except Exception as exc:  # one configuration failing must not hide the others
                failures[label] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                print(f"   {label}: FAILED {failures[label]}", flush=True)
                continue
            row.update(kernel=name, config=cfg, programs_per_sm=occupancy(row, args.arch))
            rows.append(row)
            print(f"   {label}: {row['registers']} regs, spills {row['spill_store_bytes']}/{row['spill_load_bytes']} B, "
                  f"shared {row['shared_bytes'] / 1024:.1f} KiB, {row['programs_per_sm']} programs/SM "
                  f"({row['compile_seconds']:.1f} s)", flush=True)
    payload = {"benchmark": "triton_compile", "date": C.now_iso(), "machine": C.machine_info("cpu"),
               "arch": args.arch, "hidden": args.hidden, "head_dim": args.head_dim, "results": rows,
               "failures": failures}
    path = C.write_results("triton_compile", f"sm{args.arch}", payload, Path(args.out) if args.out else None)
    print(f"results: {path}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
