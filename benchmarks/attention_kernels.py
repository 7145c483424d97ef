"""Attention kernels on the shapes SimLM runs, one layer's attention at a time.

(a) **encoding**: MS MARCO-like passages (synthetic, ~67 tokens, max 144), sorted longest first
    and packed in batches of 1,024 as ``encode_corpus_shard`` does; per kernel, the time to run
    one layer's attention over every batch, its TFLOP/s and its largest difference from
    variable-length flash attention:
    - ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (what packed encoding runs on CUDA);
    - ``triton B_M,B_N,H,W``: ``simlm_core.modeling.packed_attention`` with those blocks;
    - ``sdpa-<kernel>``: scatter to a padded ``[N, heads, L, d]`` batch, SDPA with a key mask, gather.
    Also one batch of unsorted lengths, where padding would cost most.
(b) **training**: a biencoder batch (256 passages x 144, 16 queries x 32), forward + backward,
    with and without attention dropout (0.1, BERT's): per SDPA kernel on the padded batch, and our
    Triton training kernel (``simlm_core.modeling.attention_train``, tiles from ``--train-configs``)
    on the same texts packed; then the Triton kernel on 256 passages of real lengths.

    python benchmarks/attention_kernels.py [--device cuda] [--configs "64,64,1,4;32,32,1,4"]

Prints a table and the best Triton blocks (``best triton blocks: ...``, for
``model_throughput.py --triton-blocks``); writes ``benchmarks/results/attention_kernels-<device>.json``.
On CPU only the SDPA rows run (and the Triton ones under ``TRITON_INTERPRET=1``): a smoke test.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model_throughput import make_passages, make_tokenizer, peak_tflops, resolve, sdpa_context, sync  # noqa: E402
from simlm_core.modeling.packed import varlen_available, _varlen_attn  # noqa: E402
from simlm_core.modeling.attention_train import packed_attention_train  # noqa: E402
from simlm_core.modeling.packed_attention import packed_attention, triton_attention_available  # noqa: E402
from simlm_core.modeling.triton_support import triton_available  # noqa: E402

# forward B_M,B_N,warps [, backward B_M,B_N,warps]: the library's pair first, then alternatives
DEFAULT_TRAIN_CONFIGS = "64,32,4,32,32,4;64,32,4;32,32,4;64,64,4,32,32,4;64,32,4,16,32,4;32,32,4,32,64,4;64,32,8"
DEFAULT_CONFIGS = "64,64,1,4;32,32,1,4;32,64,1,4;64,32,1,4;16,32,1,4;32,32,2,4;64,64,2,4;128,64,1,8;64,128,1,4"


def time_it(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    """Best wall seconds of ``repeats`` calls of ``fn`` (one warm-up first)."""
    fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# -- (a) encoding -------------------------------------------------------------------------------
def passage_lengths(n: int, max_len: int, work: Path) -> list[int]:
    tok, words = make_tokenizer(work / "tok")
    texts = make_passages(words, n, seed=1)
    enc = tok([""] * n, text_pair=texts, max_length=max_len, truncation=True, return_attention_mask=False)
    return [len(x) for x in enc["input_ids"]]


def padded_attention(q, k, v, cu, lengths_dev, max_len, kernel):
    """Scatter packed q/k/v to ``[N, heads, L, d]``, SDPA under ``kernel`` with a key mask, gather back."""
    n = cu.numel() - 1
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < lengths_dev[:, None]  # [N, L]
    slot = valid.flatten().nonzero().squeeze(1)

    def pad(x):
        out = x.new_zeros(n * max_len, *x.shape[1:])
        out[slot] = x
        return out.view(n, max_len, *x.shape[1:]).transpose(1, 2)

    with sdpa_context(kernel):
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
    return o.transpose(1, 2).reshape(n * max_len, *q.shape[1:])[slot]


def bench_encode(args, device, peak, work: Path) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = passage_lengths(args.passages, args.max_len, work)
    H, D = args.heads, args.head_dim
    sets = {"sorted (as encode_corpus_shard)": sorted(lengths, reverse=True),
            "unsorted": lengths[: args.batch]}
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: ~10^10 values on the host took a minute
    rows = []
    for set_name, lens in sets.items():
        batches = []
        for s in range(0, len(lens), args.batch):
            part = torch.tensor(lens[s : s + args.batch])
            t = int(part.sum())
            qkv = torch.randn(t, 3, H, D, generator=g, device=device, dtype=dtype)
            cu = torch.zeros(len(part) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(part, 0)
            batches.append((qkv, cu.to(device), part.to(device), int(part.max())))
        flops = sum(4.0 * l * l * D * H for l in lens)
        methods: dict[str, Callable] = {}
        if varlen_available(device):
            methods["varlen"] = lambda q, k, v, cu, ld, ml: _varlen_attn()(q, k, v, cu, cu, ml, ml)
        if triton_attention_available(device):
            for cfg in args.configs.split(";"):
                blocks = tuple(int(x) for x in cfg.split(","))
                if H % blocks[2] == 0:
                    methods[f"triton {cfg}"] = (lambda b: lambda q, k, v, cu, ld, ml: packed_attention(q, k, v, cu, cu, b))(blocks)
        for kernel in (args.sdpa.split(",") if args.sdpa else []):
            methods[f"sdpa-{kernel}"] = (lambda kn: lambda q, k, v, cu, ld, ml: padded_attention(q, k, v, cu, ld, ml, kn))(kernel)
        reference = None
        ref_name = next(iter(methods), None)
        for name, fn in methods.items():
            def run_all() -> list:
                with torch.inference_mode():
                    return [fn(*qkv.unbind(1), cu, ld, ml) for qkv, cu, ld, ml in batches]
            try:
                outs = run_all()
                sec = time_it(device, run_all, args.repeats)
            except Exception as exc:  # a kernel that cannot run here: say why, keep the others
                print(f"   {set_name} | {name}: FAILED {str(exc).splitlines()[0][:150]}", flush=True)
                continue
            if reference is None:
                reference = [o.float() for o in outs[:2] + outs[-1:]]
            err = max(float((o.float() - r).abs().max()) for o, r in zip(outs[:2] + outs[-1:], reference))
            tf = flops / sec / 1e12
            row = {"part": "encode", "set": set_name, "kernel": name, "seconds": sec, "tflops_per_s": tf,
                   "max_abs_diff_vs_" + str(ref_name): err, "passages": len(lens), "batches": len(batches),
                   "mean_len": sum(lens) / len(lens)}
            rows.append(row)
            print(f"   {set_name} | {name}: {sec * 1e3:8.2f} ms per layer over {len(lens):,} psg, {tf:6.1f} TFLOP/s, "
                  f"max |diff| vs {ref_name} {err:.2e}", flush=True)
    return rows


# -- (b) training -------------------------------------------------------------------------------
def bench_train(args, device, peak, work: Path) -> list[dict]:
    """Forward + backward of one layer's attention on a biencoder batch: SDPA kernels on padded
    ``[N, heads, L, d]``, and our Triton training kernel (``triton-train B_M,B_N,W``) on the same
    texts packed; then the Triton kernel on real passage lengths (what packed_training runs)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, D = args.heads, args.head_dim
    rows = []
    train_configs = []  # (forward blocks, backward blocks); three numbers serve both
    for c in (args.train_configs.split(";") if triton_available(device) else []):
        nums = tuple(int(x) for x in c.split(","))
        train_configs.append((nums[:3], nums[3:] or nums[:3]))

    def record(set_name: str, kernel: str, p: float, step: Callable[[], None], flops: float) -> None:
        try:
            sec = time_it(device, step, args.repeats * 5)
        except Exception as exc:  # a kernel that cannot run here: say why, keep the others
            print(f"   train {set_name} | {kernel} dropout {p}: FAILED {str(exc).splitlines()[0][:150]}", flush=True)
            return
        rows.append({"part": "train", "set": set_name, "kernel": kernel, "dropout": p, "seconds": sec,
                     "tflops_per_s": flops / sec / 1e12})
        print(f"   train {set_name} | {kernel} dropout {p}: {sec * 1e3:.3f} ms fwd+bwd per layer, "
              f"{flops / sec / 1e12:.1f} TFLOP/s", flush=True)

    real = passage_lengths(args.train_batch, args.max_len, work)
    sets = [("passages", [args.max_len] * args.train_batch), ("queries", [32] * args.train_queries),
            ("passages, real lengths", real)]
    for what, lengths in sets:
        n, length, uniform = len(lengths), max(lengths), len(set(lengths)) == 1
        set_name = f"{what} {n} x {length}" if uniform else f"{what}, {n} psg mean {sum(lengths) / n:.0f}"
        flops = sum(4.0 * l * l * D * H for l in lengths) * 3.5  # forward + backward (2.5x)
        if uniform:
            q, k, v = (torch.randn(n, H, length, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(n, H, length, D, device=device, dtype=dtype)
            for kernel in args.train_sdpa.split(","):
                for p in (0.1, 0.0):
                    def step(kernel: str = kernel, p: float = p) -> None:
                        with sdpa_context(kernel):
                            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
                        torch.autograd.grad(out, (q, k, v), grad)  # no accumulation into leaf .grad

                    record(set_name, kernel, p, step, flops)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        qkv = torch.randn(int(cu[-1]), 3, H, D, device=device, dtype=dtype, requires_grad=True)
        grad_p = torch.randn(int(cu[-1]), H, D, device=device, dtype=dtype)
        for fwd, bwd in train_configs:
            for p in (0.1, 0.0):
                def step_t(fwd: tuple = fwd, bwd: tuple = bwd, p: float = p) -> None:
                    torch.autograd.grad(packed_attention_train(*qkv.unbind(1), cu, cu, p, fwd, bwd), qkv, grad_p)

                record(set_name, f"triton-train {','.join(map(str, fwd))}/{','.join(map(str, bwd))}", p, step_t, flops)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--passages", type=int, default=None, help="encode: passages (cuda 65,536; cpu 2,048)")
    ap.add_argument("--batch", type=int, default=None, help="encode: batch size (cuda 1,024; cpu 256)")
    ap.add_argument("--max-len", type=int, default=144)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="Triton blocks to try: 'B_M,B_N,heads,warps;...'")
    ap.add_argument("--sdpa", default=None, help="encode: SDPA kernels on padded copies (cuda 'efficient,cudnn'; cpu 'math')")
    ap.add_argument("--train-sdpa", default=None, help="training: SDPA kernels (cuda 'flash,cudnn,efficient'; cpu 'math')")
    ap.add_argument("--train-batch", type=int, default=None, help="training: passages (cuda 256; cpu 8)")
    ap.add_argument("--train-configs", default=DEFAULT_TRAIN_CONFIGS,
                    help="training: our Triton kernel's blocks to try: 'B_M,B_N,warps[,bwd B_M,B_N,warps];...'")
    ap.add_argument("--train-queries", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="encode,train")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = resolve(args.device)
    gpu = device.type == "cuda"
    args.passages = args.passages or (65_536 if gpu else 2_048)
    args.batch = args.batch or (1_024 if gpu else 256)
    args.sdpa = args.sdpa if args.sdpa is not None else ("efficient,cudnn" if gpu else "math")
    args.train_sdpa = args.train_sdpa or ("flash,cudnn,efficient" if gpu else "math")
    args.train_batch = args.train_batch or (256 if gpu else 8)
    peak, peak_note = peak_tflops(device, None)
    info = C.machine_info(device.type)
    print(f"machine: {C.machine_line(info)}\ndevice {device}, torch {torch.__version__}, "
          f"triton attention {'yes' if triton_attention_available(device) else 'no'}, "
          f"varlen {'yes' if varlen_available(device) else 'no'}")
    rows: list[dict] = []
    t0 = time.perf_counter()
    C.SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=C.SCRATCH_DIR, prefix="attn-") as work:
        if "encode" in args.parts:
            print("-- encode (one layer's attention)", flush=True)
            rows += bench_encode(args, device, peak, Path(work))
        if "train" in args.parts:
            print("-- training (SDPA, forward + backward)", flush=True)
            rows += bench_train(args, device, peak, Path(work))
    enc = [r for r in rows if r["part"] == "encode" and r["set"].startswith("sorted")]
    tri = [r for r in enc if r["kernel"].startswith("triton")]
    if tri:
        best = min(tri, key=lambda r: r["seconds"])
        base = next((r for r in enc if r["kernel"] == "varlen"), None)
        print(f"best triton blocks: {best['kernel'].split()[1]}" +
              (f" ({base['seconds'] / best['seconds']:.2f}x varlen)" if base else ""))
    headers = ["part", "set", "kernel", "ms", "TFLOP/s"]
    print(C.table(headers, [[r["part"], r["set"], r["kernel"] + (f", dropout {r['dropout']}" if "dropout" in r else ""),
                             r["seconds"] * 1e3, r["tflops_per_s"]] for r in rows],
                  title=f"== attention kernels on {info.get('gpu_name') or info['cpu_model']}"))
    payload = {"benchmark": "attention_kernels", "date": C.now_iso(), "machine": info, "device": str(device),
               "settings": vars(args), "peak_tflops": peak, "peak_note": peak_note, "results": rows,
               "total_seconds": round(time.perf_counter() - t0, 1)}
    path = C.write_results("attention_kernels", device.type, payload, Path(args.out) if args.out else None)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
