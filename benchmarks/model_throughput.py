"""Model throughput: corpus encoding, SimLM pre-training and biencoder training, with FLOPs and MFU.

    python benchmarks/model_throughput.py                       # auto device, BERT-base shapes
    python benchmarks/model_throughput.py --device cuda         # the GPU run: < ~4 min on H100/H200
    python benchmarks/model_throughput.py --device cpu --model-size tiny   # quick smoke test

Everything is built from configs with random weights (no hub access) and a synthetic WordPiece
vocabulary of BERT's size (30,522), so it runs offline anywhere. It imports only what it needs
from ``simlm_core`` (encode, modeling.biencoder, modeling.pretrain, pretraining.RLMCollator): no
faiss, no Java.

(a) encode    passages/s of ``simlm_core.encode.encode_texts`` (tokenise, length-sort, batch, pad,
              forward, CLS pool, L2-normalise; bf16 autocast on CUDA) and of
              ``encode_corpus_shard`` (Parquet -> .npy, tokenising in a helper thread), against a
              bare Hugging Face forward loop over the SAME pre-tokenised, length-sorted, padded
              batches already on the device. overhead = encode time / bare time (target <= 1.1x).
(b) pretrain  ``SimLMForPretraining`` (BERT-base encoder + MLM head, 2-layer decoder, frozen
              ELECTRA-base-generator-shaped generator: embedding 768, hidden 256, 12 layers,
              4 heads, FFN 1024) forward + backward + AdamW step on ``RLMCollator`` batches of
              B x 144 tokens (64 on GPU). The collator's own CPU cost is reported separately.
(c) biencoder ``BiEncoder`` training step: Q queries x group G passages (16 x 16 on GPU),
              q 32 / p 144 tokens, contrastive loss with in-batch negatives, AdamW.
(d) rerank    ``CrossEncoder.score_pairs`` (re-ranking, teacher scoring: tokenise in a helper
              thread, length-sort, forward, one logit) against a bare forward loop over the same
              pre-tokenised batches on the device; ELECTRA-base shape, len 192. overhead as in (a).

FLOPs (analytic, stated in the output): for a transformer encoder with L layers, width h, FFN
width I over sequences of padded length s (T tokens in all),
    forward = 2 * T * L * (4h^2 + 2hI)  +  sum over sequences of 4 * L * s^2 * h   (attention scores
              + context), plus 2 * n * (h^2 + hV) for an MLM head applied to n tokens (V = vocab),
    training = 3 x forward of the trained parts (forward + backward = 2x forward); the frozen
              generator counts its forward only (it runs under no_grad).
Embedding look-ups, LayerNorm, softmax, GELU and the optimizer are not counted (standard MFU
practice). MFU = achieved FLOP/s / the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s;
``--peak-tflops`` overrides); on CPU the achieved GFLOP/s is reported instead.

GPU timing: warm-up iterations first, then ``torch.cuda.Event`` around the timed loop, with one
synchronisation before and after it (none inside). Results: ``benchmarks/results/model_throughput-{cpu,cuda}.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from simlm_core.modeling.packed_attention import DEFAULT_BLOCKS  # noqa: E402

VOCAB = 30_522
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched against torch's device name.
PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
         ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
         ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0)]

SIZES = {
    # encoder (BERT-base), generator (ELECTRA-base generator)
    "base": {"enc": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
             "gen": dict(embedding_size=768, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                         intermediate_size=1024)},
    "tiny": {"enc": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
             "gen": dict(embedding_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                         intermediate_size=256)},
}
# Work per part: (cuda, cpu-base, cpu-tiny)
DEFAULTS = {
    "encode_passages": (65_536, 96, 1024),
    "encode_batch": (512, 32, 128),
    "rerank_pairs": (16_384, 64, 512),
    "rerank_batch": (128, 32, 128),
    "pretrain_batch": (64, 4, 16),
    "bi_queries": (16, 2, 8),
    "bi_group": (16, 4, 8),
    "warmup": (3, 1, 2),
    "iters": (10, 3, 5),
}


# =============================================================================================
# Synthetic vocabulary and text
def make_tokenizer(out_dir: Path, seed: int = 0):
    """A BERT WordPiece tokenizer over 30,522 synthetic entries (specials, letters, ##letters, words)."""
    from transformers import BertTokenizerFast

    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(letters) + ["##" + c for c in letters]
    seen = set(vocab)
    words: list[str] = []
    while len(vocab) < VOCAB:
        w = "".join(rng.choice(list(letters), size=int(rng.integers(3, 10))))
        piece = w if rng.random() < 0.85 else "##" + w
        if piece not in seen:
            seen.add(piece)
            vocab.append(piece)
            if not piece.startswith("##"):
                words.append(piece)
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(out_dir))
    return tok, words


def make_passages(words: list[str], n: int, seed: int, mean_words: float = 52.0, min_words: int = 4,
                  max_words: int = 240) -> list[str]:
    """MS MARCO-like passages: lognormal word counts (mean ~56), Zipf word choice, 5% unseen words
    (split into word pieces), so lengths vary as in the real corpus."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(len(words))
    cdf = np.cumsum(1.0 / (ranks + 2.7))
    cdf /= cdf[-1]
    out = []
    for _ in range(n):
        k = int(np.clip(round(rng.lognormal(math.log(mean_words), 0.42)), min_words, max_words))
        idx = np.searchsorted(cdf, rng.random(k))
        ws = [words[i] for i in idx]
        for j in np.flatnonzero(rng.random(k) < 0.05):
            ws[j] = ws[j] + words[int(rng.integers(len(words)))][:3]
        out.append(" ".join(ws))
    return out


# =============================================================================================
# FLOPs
def layer_matmul_params(h: int, inter: int) -> int:
    return 4 * h * h + 2 * h * inter


def encoder_forward_flops(cfg: dict, seq_lens: list[int] | np.ndarray, layers: int | None = None) -> float:
    """2 * tokens * L * (4h^2 + 2hI) + sum_seq 4 * L * s^2 * h."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    L = cfg["num_hidden_layers"] if layers is None else layers
    s = np.asarray(seq_lens, dtype=np.float64)
    return float(2 * s.sum() * L * layer_matmul_params(h, inter) + (4 * L * h * s ** 2).sum())


def packed_forward_flops(cfg: dict, seq_lens: list[int] | np.ndarray) -> float:
    """What the packed [CLS] encoder runs: every layer on real tokens, except the last one's
    attention queries, output projection and feed-forward block, which run on [CLS] rows only."""
    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    s = np.asarray(seq_lens, dtype=np.float64)
    full = encoder_forward_flops(cfg, s, layers=L - 1)
    last = 2 * s.sum() * 3 * h * h + (4 * h * s).sum()  # q/k/v on all tokens; 1 query row per text
    last += 2 * len(s) * (h * h + 2 * h * inter)  # output projection + feed-forward on [CLS] rows
    return float(full + last)


def mlm_head_flops(h: int, n_tokens: float, vocab: int = VOCAB) -> float:
    return float(2 * n_tokens * (h * h + h * vocab))


def generator_forward_flops(g: dict, seq_lens, vocab: int = VOCAB) -> float:
    """ELECTRA generator: embeddings_project E->h, encoder, generator head h->E, LM head E->V (all tokens)."""
    e, h = g["embedding_size"], g["hidden_size"]
    s = np.asarray(seq_lens, dtype=np.float64)
    proj = 2 * s.sum() * (e * h if e != h else 0)
    head = 2 * s.sum() * (h * e + e * vocab)
    return float(proj + encoder_forward_flops(g, s) + head)


# =============================================================================================
# Device, timing
def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    return torch.device(device)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu: no MFU, achieved GFLOP/s reported"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS:
        if key in name:
            return value, f"dense bf16 peak of {key}"
    return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time, plus CUDA-event time on GPU; synchronises only at the start and the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = self.gpu_seconds = None

    def __enter__(self) -> "Timer":
        sync(self.device)
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.gpu_seconds = self._start.elapsed_time(self._end) / 1000.0
        self.seconds = time.perf_counter() - self._t0

    @property
    def best(self) -> float:
        return self.gpu_seconds if self.gpu_seconds is not None else self.seconds


def timed_loop(device: torch.device, iters: int, fn: Callable[[int], None]) -> tuple[float, list[float]]:
    """Seconds per iteration. CUDA: events around the whole loop (no sync inside), the mean. CPU:
    each iteration timed, the best kept (a shared CPU makes single iterations several times slower
    when another tenant takes a core from the OpenMP team); all times are returned."""
    if device.type == "cuda":
        with Timer(device) as t:
            for i in range(iters):
                fn(i)
        return t.best / iters, [t.best / iters]
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times), times


def compile_modes(args) -> list[str]:
    return [m.strip() for m in args.compile_modes.split(",") if m.strip()]


def compiled(module: torch.nn.Module, mode: str, **kw: Any) -> torch.nn.Module:
    """``torch.compile(module)`` in ``mode`` ("default" = torch's default), with dynamo's caches
    cleared first so that one mode's guards and recompile budget do not leak into the next."""
    torch._dynamo.reset()
    return torch.compile(module, mode=None if mode == "default" else mode, **kw)


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
                 "math": "MATH"}


def sdpa_backends(args, device: torch.device) -> list[str]:
    """The requested attention kernels that can run here on a padded (masked) bf16 batch."""
    names = [b.strip() for b in args.sdpa_backends.split(",") if b.strip()]
    unknown = [b for b in names if b != "default" and b not in SDPA_BACKENDS]
    if unknown:
        raise SystemExit(f"--sdpa-backends: unknown {unknown}; choose from default, {', '.join(SDPA_BACKENDS)}")
    usable = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 12, 72, 64, device=device, dtype=dtype)
    mask = torch.ones(2, 1, 72, 72, device=device, dtype=torch.bool)
    mask[1, :, :, 60:] = False
    for name in names:
        try:
            with sdpa_context(name):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            usable.append(name)
        except RuntimeError as exc:
            print(f"   SDPA {name}: not usable here with a padding mask ({str(exc).splitlines()[0][:90]})")
    return usable


def sdpa_context(backend: str):
    """Restrict PyTorch's scaled-dot-product attention to one kernel ("default": torch's choice)."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])])


def tag(mode: str, backend: str) -> str:
    """Row label suffix for a compile mode / attention kernel that is not the default."""
    return (f", mode {mode}" if mode != "default" else "") + (f", SDPA {backend}" if backend != "default" else "")


def training_variants(args, device: torch.device, label: str, model: torch.nn.Module,
                      step: Callable[[torch.nn.Module, int], None]) -> list[tuple[str, str, float, float]]:
    """The training step (``step(model, i)``: one optimizer step on batch ``i``) under each
    requested attention kernel, eager and through ``torch.compile`` in each requested mode.

    Returns ``(mode or "eager", SDPA kernel, seconds per step, compile seconds)`` per variant;
    without variants, only the eager step is profiled (``--profile``).
    """
    if not (args.variants and (device.type == "cuda" or args.variants == 2)):
        profile_top(device, f"{label}, eager", lambda: step(model, 0), args.profile)
        return []
    found = []
    for backend in sdpa_backends(args, device):
        with sdpa_context(backend):
            if backend != "default":  # eager under this attention kernel
                sec_e, _ = timed_loop(device, args.iters, lambda i: step(model, i))
                found.append(("eager", backend, sec_e, 0.0))
                print(f"   eager{tag('default', backend)}: {sec_e * 1e3:.1f} ms/step", flush=True)
            for mode in compile_modes(args):
                model_c = compiled(model, mode)  # what TrainingArguments(torch_compile=True) does to the model
                run = step
                if "reduce-overhead" in mode:  # CUDA graphs: tell the graph trees where a step begins
                    def run(m: torch.nn.Module, i: int) -> None:
                        torch.compiler.cudagraph_mark_step_begin()
                        step(m, i)
                t0 = time.perf_counter()
                for i in range(args.warmup):
                    run(model_c, i)
                sync(device)
                compile_s = time.perf_counter() - t0
                sec_c, _ = timed_loop(device, args.iters, lambda i: run(model_c, i))
                found.append((mode, backend, sec_c, compile_s))
                print(f"   compiled{tag(mode, backend)}: {sec_c * 1e3:.1f} ms/step, compile {compile_s:.0f} s",
                      flush=True)
                profile_top(device, f"{label}, compile{tag(mode, backend)}", lambda: run(model_c, 0), args.profile)
    return found


def profile_top(device: torch.device, label: str, fn: Callable[[], None], top: int) -> None:
    """Print the ``top`` kernels by device time over three calls of ``fn`` (where the time goes)."""
    if not top or device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        sync(device)
    print(f"   profile, {label} (3 calls; top {top} by device time):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))
    print(kernel_classes(prof, calls=3))


KERNEL_CLASSES = [  # (class, name fragments), first match wins
    ("dropout-add-LayerNorm (ours)", ("dropout_add_layer_norm",)),
    ("attention (ours)", ("attention_train_fwd", "attention_train_bwd", "packed_attention_fwd")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "triton_mm", "cublas", "splitk", "tst_")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("embedding", ("embedding", "index_put", "indexing_backward", "radix", "sort")),
    ("fused elementwise/norm (triton)", ("triton_",)),
]


def kernel_classes(prof: Any, calls: int) -> str:
    """Device time per call by kernel class (GEMMs, attention, optimizer, ...): where a step's time goes."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        name = e.key.lower()
        cls = next((c for c, frags in KERNEL_CLASSES if any(f in name for f in frags)), "other")
        totals[cls] = totals.get(cls, 0.0) + us
    whole = sum(totals.values()) or 1.0
    parts = [f"{c} {t / calls / 1e3:.2f} ms ({100 * t / whole:.0f}%)" for c, t in
             sorted(totals.items(), key=lambda kv: -kv[1])]
    return f"   device time per call by kernel class (total {whole / calls / 1e3:.2f} ms): " + "; ".join(parts)


def optimizer_step(device: torch.device, opt: torch.optim.Optimizer,
                   loss: Callable[[torch.nn.Module, int], torch.Tensor]) -> Callable[[torch.nn.Module, int], None]:
    """A training step ``step(model, i)``: ``loss(model, i)`` under autocast, backward, ``opt`` step."""
    def step(m: torch.nn.Module, i: int) -> None:
        with autocast(device):
            value = loss(m, i)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def maybe_fuse(args, model: torch.nn.Module) -> str:
    """``--fused-norm 1`` / ``--fused-attention 1``: the model's dropout-add-LayerNorms / attention on
    our Triton kernels, switched as the ``fused_norm`` / ``fused_attention`` train settings switch
    them (``simlm_core.training``: self-check first); returns the row-label suffix."""
    from simlm_core.training import fuse_attention, fuse_norms

    suffix = ""
    if args.fused_norm and fuse_norms(model):
        suffix += ", fused_norm"
    if args.fused_attention and fuse_attention(model):
        suffix += ", fused_attention"
    return suffix


def set_train_attention(args, model: torch.nn.Module) -> str:
    """``--train-attention``: the attention of ``model``'s packed encoders (packed_training); row-label suffix."""
    if args.train_attention == "auto":
        return ""
    encoders = [m.__dict__["_packed_encoder"] for m in model.modules() if "_packed_encoder" in m.__dict__]
    for enc in encoders:
        enc.attention = args.train_attention
    return f", attention {args.train_attention}" if encoders else ""


def on_device(batch: dict, device: torch.device) -> dict:
    """A collator's batch with its tensors moved to ``device`` (host values, e.g. ``num_tokens``, kept)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def with_token_count(batch: dict) -> dict:
    """``batch`` plus the host's count of its real tokens, as the pipeline's collators send it."""
    return {**batch, "num_tokens": int(batch["attention_mask"].sum())}


def autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rate_row(part: str, what: str, shape: str, items: float, unit: str, tokens: float, flops: float,
             seconds: float, peak: float | None, extra: dict | None = None) -> dict:
    achieved = flops / seconds if seconds else float("nan")
    return {
        "part": part, "what": what, "shape": shape, "seconds": seconds,
        "items_per_s": items / seconds if seconds else None, "unit": unit,
        "tokens_per_s": tokens / seconds if seconds else None,
        "flops": flops, "tflops_per_s": achieved / 1e12, "gflops_per_s": achieved / 1e9,
        "mfu": (achieved / (peak * 1e12)) if peak else None, **(extra or {}),
    }


# =============================================================================================
# (a) encoding
def bench_encode(args, device, size, work: Path, peak) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import BertConfig, BertModel

    from simlm_core.collators import passage_inputs, tokenize_passages
    from simlm_core.encode import encode_corpus_shard, encode_texts, load_encoder
    from simlm_core.tokenized import BackendTokenizer
    from simlm_core.modeling.biencoder import BiEncoder

    n, bs, max_len = args.encode_passages, args.encode_batch, 144
    tok, words = make_tokenizer(work / "tok")
    texts = make_passages(words, n, seed=1)
    items = [("", t) for t in texts]  # MS MARCO: no titles -> [CLS] [SEP] text [SEP]

    model_dir = work / "encoder"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **SIZES[size]["enc"])
    BiEncoder(BertModel(cfg, add_pooling_layer=True), tokenizer=tok).save_pretrained(model_dir)
    model = load_encoder(model_dir, device=device)
    use_bf16 = device.type == "cuda"

    # The same batches encode_texts builds: tokenise, sort longest first, pad each batch to its longest.
    t0 = time.perf_counter()
    enc = tokenize_passages(tok, [t for t, _ in items], [x for _, x in items], max_len, "pair")
    tokenize_s = time.perf_counter() - t0
    lengths = np.fromiter((len(x) for x in enc["input_ids"]), np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")
    batches, widths = [], []
    for s in range(0, n, bs):
        idx = order[s : s + bs]
        w = int(lengths[idx[0]])
        ids = np.zeros((len(idx), w), np.int64)
        mask = np.zeros((len(idx), w), np.int64)
        tt = np.zeros((len(idx), w), np.int64)
        for r, j in enumerate(idx):
            k = int(lengths[j])
            ids[r, :k], mask[r, :k], tt[r, :k] = enc["input_ids"][j], 1, enc["token_type_ids"][j]
        batches.append(tuple(torch.from_numpy(a).to(device) for a in (ids, mask, tt)))
        widths += [w] * len(idx)
    padded_tokens = float(sum(widths))
    real_tokens = float(lengths.sum())
    flops = encoder_forward_flops(SIZES[size]["enc"], widths)
    encoder = model.encoder
    out = torch.empty((n, model.hidden_size), dtype=torch.float16, device=device)

    def bare(cpu_bf16: bool = False) -> None:
        ac = autocast(device) if use_bf16 else contextlib.nullcontext()
        if cpu_bf16:
            ac = torch.autocast("cpu", dtype=torch.bfloat16)
        with torch.inference_mode(), ac:
            pos = 0
            for ids, mask, tt in batches:
                h = encoder(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[:, 0]
                out[pos : pos + len(ids)] = torch.nn.functional.normalize(h.float(), dim=-1).to(out.dtype)
                pos += len(ids)

    def via_encode() -> None:
        encode_texts(model, tok, items, max_len=max_len, batch_size=bs, bf16=True)

    # warm-up (kernels, allocator, tokenizer) on a slice
    warm_items = items[: min(n, 2 * bs)]
    encode_texts(model, tok, warm_items, max_len=max_len, batch_size=bs, bf16=True)
    ac = autocast(device) if use_bf16 else contextlib.nullcontext()
    with torch.inference_mode(), ac:
        for ids, mask, tt in batches[: 2]:
            encoder(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    sync(device)

    # encode_corpus_shard loads the model itself: its load time (warm, as on the second call) is
    # measured apart and subtracted.
    t0 = time.perf_counter()
    model2 = load_encoder(model_dir, device=device)
    sync(device)
    load_s = time.perf_counter() - t0
    del model2
    # Chunk size of encode_corpus_shard (passages length-sorted and tokenised together). CUDA: n/4
    # (>= 16 batches) so the tokeniser thread overlaps the device as in a full-size shard, where
    # the library default 50,000 gives ~22 chunks; CPU: the library default (one chunk here, hence
    # the very batches of the bare loop). --chunk-rows overrides.
    chunk_rows = args.chunk_rows or (max(16 * bs, n // 4) if device.type == "cuda" else 50_000)
    corpus = work / "corpus.parquet"
    pq.write_table(pa.table({"pid": [str(i) for i in range(n)], "title": [""] * n, "text": texts}), corpus)

    def via_shard(**kw) -> dict:
        return encode_corpus_shard(model_dir, corpus, 0, 1, work / "emb.npy", work / "ids.parquet",
                                   batch_size=bs, device=device, bf16=True, chunk_rows=chunk_rows,
                                   show_progress=False, **kw)

    # Interleaved repeats, best of each: robust to a noisy shared machine.
    times: dict[str, list[float]] = {"bare": [], "encode_texts": [], "encode_corpus_shard": []}
    summary: dict = {}
    for _ in range(args.repeats):
        with Timer(device) as tb:
            bare()
        times["bare"].append(tb.best)
        if not args.encode_pipeline:
            continue
        with Timer(device) as te:
            via_encode()
        t0 = time.perf_counter()
        summary = via_shard()
        times["encode_texts"].append(te.best)
        times["encode_corpus_shard"].append(time.perf_counter() - t0)
    best_bare = min(times["bare"])
    best_enc = min(times["encode_texts"], default=float("nan"))
    shard_s = min(times["encode_corpus_shard"], default=float("nan"))
    shard_net = max(1e-9, shard_s - load_s)

    bf16_probe = None
    if device.type == "cpu" and args.cpu_bf16_probe:
        # Not what encode.py does on CPU (fp32 there): how much a bf16 autocast would give on this CPU.
        bare(cpu_bf16=True)
        probe_times = []
        for _ in range(max(1, args.repeats - 1)):
            with Timer(device) as tp:
                bare(cpu_bf16=True)
            probe_times.append(tp.best)
        bf16_probe = min(probe_times)
        times["bare_cpu_bf16"] = probe_times

    shape = f"{n:,} psg, batch {bs}, max_len {max_len}, mean {real_tokens / n:.0f} tok ({padded_tokens / n:.0f} padded)"
    extra = {"real_tokens": real_tokens, "padded_tokens": padded_tokens, "times": times,
             "tokenize_seconds": tokenize_s, "tokenize_passages_per_s": n / tokenize_s, "chunk_rows": chunk_rows}
    rows = [rate_row("encode", "bare HF forward loop", shape, n, "psg", padded_tokens, flops, best_bare, peak, extra)]
    if args.encode_pipeline:
        rows += [
            rate_row("encode", "simlm_core.encode.encode_texts", shape, n, "psg", padded_tokens, flops, best_enc, peak,
                     {"overhead_vs_bare": best_enc / best_bare}),
            rate_row("encode", "encode_corpus_shard (excl. model load)", shape, n, "psg", padded_tokens, flops,
                     shard_net, peak, {"overhead_vs_bare": shard_net / best_bare, "wall_incl_load_s": shard_s,
                                       "model_load_s": load_s, "summary": summary}),
        ]
    rows.append(rate_row("encode", "tokenize_passages only (CPU, no model; transformers' call)", shape, n, "psg",
                         real_tokens, 0.0, tokenize_s, None))
    backend = BackendTokenizer(tok, max_len)
    inputs = passage_inputs([t for t, _ in items], [x for _, x in items], "pair")
    t0 = time.perf_counter()
    backend(inputs)
    backend_s = time.perf_counter() - t0
    rows.append(rate_row("encode", "BackendTokenizer only (CPU, no model; what encoding uses)", shape, n, "psg",
                         real_tokens, 0.0, backend_s, None))
    if args.variants and (device.type == "cuda" or args.variants == 2):
        rows += _encode_variants(args, device, size, encoder, batches, out, peak, shape, n, via_shard_kwargs={
            "model_dir": model_dir, "corpus": corpus, "work": work, "bs": bs, "chunk_rows": chunk_rows,
            "load_s": load_s})
    if bf16_probe is not None:
        rows.append(rate_row("encode", "probe: bare loop, CPU bf16 autocast", shape, n, "psg", padded_tokens, flops,
                             bf16_probe, peak, {"speedup_vs_fp32_bare": best_bare / bf16_probe,
                                                "note": "encode.py uses fp32 on CPU; bf16 only on CUDA"}))
    return rows


def _pad_batches_to(batches: list[tuple[torch.Tensor, ...]], multiple: int) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for b in batches:
        extra = (-b[0].shape[1]) % multiple
        out.append(tuple(torch.nn.functional.pad(t, (0, extra)) for t in b))
    return out


def _encode_variants(args, device, size, encoder, batches, out, peak, shape, n, via_shard_kwargs) -> list[dict]:
    """GPU: the same forward with bf16 weights (no autocast), then also through torch.compile."""
    import copy

    from simlm_core.encode import encode_corpus_shard

    enc_cfg = SIZES[size]["enc"]
    enc_bf16 = copy.deepcopy(encoder).to(torch.bfloat16).eval()
    batches8 = _pad_batches_to(batches, 8)
    widths8 = [b[0].shape[1] for b in batches8 for _ in range(b[0].shape[0])]
    flops8 = encoder_forward_flops(enc_cfg, widths8)

    def loop(enc, bl) -> None:
        with torch.inference_mode():
            pos = 0
            for ids, mask, tt in bl:
                h = enc(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[:, 0]
                out[pos : pos + len(ids)] = torch.nn.functional.normalize(h.float(), dim=-1).to(out.dtype)
                pos += len(ids)

    def best_of(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(args.repeats):
            with Timer(device) as t:
                fn()
            ts.append(t.best)
        return min(ts)

    rows = []
    for backend in sdpa_backends(args, device):
        with sdpa_context(backend):
            sec = best_of(lambda: loop(enc_bf16, batches))
        print(f"   eager, bf16 weights{tag('default', backend)}: {n / sec:,.0f} psg/s", flush=True)
        rows.append(rate_row("encode", f"bare loop, bf16 weights (no autocast){tag('default', backend)}", shape, n,
                             "psg", float(sum(b[0].numel() for b in batches)), encoder_forward_flops(
                                 enc_cfg, [b[0].shape[1] for b in batches for _ in range(b[0].shape[0])]),
                             sec, peak))
        for mode in compile_modes(args):
            with sdpa_context(backend):
                t0 = time.perf_counter()
                model_c = compiled(enc_bf16, mode, dynamic=True)
                loop(model_c, batches8)
                sync(device)
                compile_s = time.perf_counter() - t0
                sec = best_of(lambda: loop(model_c, batches8))
                print(f"   compiled{tag(mode, backend)}: {n / sec:,.0f} psg/s, compile {compile_s:.0f} s", flush=True)
                rows.append(rate_row("encode", f"bare loop, bf16 weights + torch.compile{tag(mode, backend)} "
                                     "(widths x8)", shape, n, "psg", float(sum(widths8)), flops8, sec, peak,
                                     {"compile_seconds": compile_s}))
                profile_top(device, f"encode bare loop, compile{tag(mode, backend)}",
                            lambda: loop(model_c, batches8[:4]), args.profile)
            del model_c
    torch._dynamo.reset()
    if args.packed:
        try:
            rows += _packed_variants(args, device, size, enc_bf16, batches, out, peak, shape, n, best_of)
        except Exception as exc:  # keep the rows above
            print(f"   packed variants FAILED: {''.join(traceback.format_exception(exc))[-2500:]}", flush=True)
        torch._dynamo.reset()
    if not args.encode_pipeline:
        return rows
    kw = via_shard_kwargs
    for packed in ((False, True) if args.packed else (False,)):
        walls = []
        for _ in range(2):  # the first call compiles; the second finds the compiled kernels cached
            t0 = time.perf_counter()
            summary = encode_corpus_shard(kw["model_dir"], kw["corpus"], 0, 1, kw["work"] / "emb_c.npy",
                                          kw["work"] / "ids_c.parquet", batch_size=kw["bs"], device=device,
                                          bf16=True, chunk_rows=kw["chunk_rows"], show_progress=False, compile=True,
                                          packed=packed)
            walls.append(time.perf_counter() - t0)
        first, second = walls
        net = max(1e-9, second - kw["load_s"])
        print(f"   encode_corpus_shard(compile=True, packed={packed}): {n / net:,.0f} psg/s (2nd call, excl. load)",
              flush=True)
        rows.append(rate_row("encode", f"encode_corpus_shard(compile=True{', packed=True' if packed else ''}), "
                             "2nd call (excl. load)", shape, n, "psg", float(sum(widths8)), flops8, net, peak,
                             {"first_call_wall_s": first, "second_call_wall_s": second, "summary": summary}))
        torch._dynamo.reset()
    del enc_bf16
    return rows


def _packed_variants(args, device, size, enc_bf16, batches, reference, peak, shape, n, best_of) -> list[dict]:
    """The padding-free encoder (simlm_core.modeling.packed) on the same batches: eager, compiled,
    and compiled with the GELU in the GEMM epilogue; each checked against the bare loop's vectors."""
    from simlm_core.modeling.packed import PackedBatch, PackedBertEncoder

    lengths = [int(x) for _, mask, _ in batches for x in mask.sum(1).tolist()]
    packed_batches = [PackedBatch.from_padded(ids, mask, tt) for ids, mask, tt in batches]
    flops = packed_forward_flops(SIZES[size]["enc"], lengths)
    got = torch.empty_like(reference)
    rows = []
    blocks = tuple(int(x) for x in args.triton_blocks.split(","))
    kernels = [k.strip() for k in args.packed_attention.split(",") if k.strip()]
    for attention, gelu_epilogue in [(a, g) for a in kernels for g in (False, True)]:
        variants = [(m, m) for m in compile_modes(args)]
        if not gelu_epilogue:
            variants.insert(0, ("eager", None))
        for label, mode in variants:
            model = PackedBertEncoder(enc_bf16, pooling="cls", gelu_epilogue=gelu_epilogue, attention=attention,
                                      attention_blocks=blocks)
            if mode is not None:
                model.compile(dynamic=True, **({} if mode == "default" else {"mode": mode}))

            def loop(bl: list = packed_batches) -> None:
                with torch.inference_mode():
                    pos = 0
                    for b in bl:
                        h = model.encode(b)
                        got[pos : pos + len(b)] = torch.nn.functional.normalize(h.float(), dim=-1).to(got.dtype)
                        pos += len(b)

            t0 = time.perf_counter()
            loop()
            sync(device)
            compile_s = time.perf_counter() - t0 if mode is not None else 0.0
            sec = best_of(loop)
            cos = torch.nn.functional.cosine_similarity(got.float(), reference.float(), dim=-1)
            kernel = model.attention_kernel(reference.to(torch.bfloat16))
            what = (f"packed (no padding, [CLS]-only last layer), {'compiled ' + label if mode else 'eager'}"
                    f"{', GELU in GEMM epilogue (tanh)' if gelu_epilogue else ''}"
                    f"{f', {kernel} attention' + (f' {blocks}' if kernel == 'triton' else '') if attention != 'auto' else ''}")
            print(f"   {what}: {n / sec:,.0f} psg/s, compile {compile_s:.0f} s, attention {kernel}, "
                  f"cosine vs bare loop min {float(cos.min()):.5f} mean {float(cos.mean()):.6f}", flush=True)
            rows.append(rate_row("encode", what, shape, n, "psg", float(sum(lengths)), flops, sec, peak,
                                 {"compile_seconds": compile_s, "cosine_min": float(cos.min()),
                                  "cosine_mean": float(cos.mean())}))
            profile_top(device, what, lambda: loop(packed_batches[:4]), args.profile if mode else 0)
        del model
    return rows


# =============================================================================================
# (b) pre-training
def bench_pretrain(args, device, size, work: Path, peak) -> list[dict]:
    from transformers import BertConfig, BertForMaskedLM, ElectraConfig, ElectraForMaskedLM

    from simlm_core.modeling.pretrain import GeneratorReplacer, SimLMForPretraining

    tok, words = make_tokenizer(work / "tok")
    B, max_len = args.pretrain_batch, 144
    # Passages long enough to fill 144 tokens: every step is B x 144.
    texts = make_passages(words, B * 4, seed=2, mean_words=200, min_words=180, max_words=300)
    examples = [{"title": "", "text": t} for t in texts]
    try:
        from simlm_core.pretraining import RLMCollator

        collator = RLMCollator(tok, max_len=max_len, pad_to_multiple_of=8 if device.type == "cuda" else None)
        collator_name = "simlm_core.pretraining.RLMCollator"
    except Exception as exc:  # e.g. transformers' Trainer import failing on a bare GPU image
        print(f"   RLMCollator unavailable ({exc!r}); using simple 30%/50% masks")
        collator, collator_name = _simple_rlm_collator(tok, max_len), "fallback masks"
    t0 = time.perf_counter()
    batches_cpu = [collator(examples[i * B : (i + 1) * B]) for i in range(4)]
    collate_s = (time.perf_counter() - t0) / 4
    batches = [on_device(b, device) for b in batches_cpu]

    torch.manual_seed(0)
    enc_cfg = SIZES[size]["enc"]
    gen_cfg = SIZES[size]["gen"]
    encoder = BertForMaskedLM(BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **enc_cfg))
    generator = ElectraForMaskedLM(ElectraConfig(vocab_size=VOCAB, max_position_embeddings=512, **gen_cfg))
    model = SimLMForPretraining(encoder, replacer=GeneratorReplacer(generator), decoder_layers=2).to(device)
    generator.to(device)
    model.train()
    fused = maybe_fuse(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))

    step = optimizer_step(device, opt, lambda m, i: m(**batches[i % len(batches)]).loss)

    for i in range(args.warmup):
        step(model, i)
    sec, iter_times = timed_loop(device, args.iters, lambda i: step(model, i))
    compiled_rows = training_variants(args, device, "RLM step", model, step)

    b0 = batches_cpu[0]
    s = b0["input_ids"].shape[1] if "input_ids" in b0 else b0["encoder_input_ids"].shape[1]
    seqs = [s] * B
    n_lab = float((b0["labels"] != -100).sum())
    h = enc_cfg["hidden_size"]
    enc_f = encoder_forward_flops(enc_cfg, seqs) + mlm_head_flops(h, n_lab)
    dec_f = encoder_forward_flops(enc_cfg, seqs, layers=2) + mlm_head_flops(h, n_lab)
    gen_f = 2 * generator_forward_flops(gen_cfg, seqs)  # two masked copies, forward only
    flops = 3 * (enc_f + dec_f) + gen_f
    tokens = float(B * s)
    n_params = sum(p.numel() for p in params)
    row = rate_row("pretrain", f"SimLM RLM step (fwd+bwd+AdamW){fused}", f"{B} x {s}, gen frozen", B, "psg", tokens,
                   flops, sec, peak, {
                       "step_seconds": sec, "steps_per_s": 1 / sec, "trainable_params": n_params,
                       "iteration_seconds": iter_times,
                       "generator_params": sum(p.numel() for p in generator.parameters()),
                       "flops_split": {"encoder_fwd": enc_f, "decoder_fwd": dec_f, "generator_fwd_x2": gen_f},
                       "labelled_tokens": n_lab, "collator": collator_name,
                       "collator_seconds_per_batch": collate_s,
                       "collator_passages_per_s": B / collate_s,
                       "peak_gpu_mem_gib": (torch.cuda.max_memory_allocated(device) / C.GIB) if device.type == "cuda" else None,
                   })
    rows = [row]
    for mode, backend, sec_c, compile_s in compiled_rows:
        what = (f"SimLM RLM step{tag('default', backend)}" if mode == "eager"
                else f"SimLM RLM step, torch.compile(model){tag(mode, backend)}") + fused
        rows.append(rate_row("pretrain", what, f"{B} x {s}, gen frozen", B, "psg", tokens, flops, sec_c, peak,
                             {"step_seconds": sec_c, "compile_seconds": compile_s}))
    del model, opt, encoder, generator, batches
    return rows


def _simple_rlm_collator(tok, max_len: int) -> Callable:
    def collate(examples):
        enc = tok([e["title"] for e in examples], [e["text"] for e in examples], truncation=True,
                  max_length=max_len, padding=True, return_tensors="pt")
        ids, attn = enc["input_ids"], enc["attention_mask"].bool()
        special = torch.isin(ids, torch.tensor(tok.all_special_ids))
        cand = attn & ~special
        em = cand & (torch.rand(ids.shape) < 0.3)
        dm = em | (cand & (torch.rand(ids.shape) < 0.2857))
        out = {"encoder_input_ids": ids.masked_fill(em, tok.mask_token_id),
               "decoder_input_ids": ids.masked_fill(dm, tok.mask_token_id),
               "attention_mask": enc["attention_mask"], "labels": ids.masked_fill(~cand, -100),
               "encoder_mlm_mask": em, "decoder_mlm_mask": dm, "token_type_ids": enc["token_type_ids"]}
        return out

    return collate


# =============================================================================================
# (c) biencoder training
def bench_biencoder(args, device, size, work: Path, peak) -> list[dict]:
    from transformers import BertConfig, BertModel

    from simlm_core.modeling.biencoder import BiEncoder

    Q, G, lq, lp = args.bi_queries, args.bi_group, 32, 144
    torch.manual_seed(0)
    enc_cfg = SIZES[size]["enc"]
    model = BiEncoder(BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **enc_cfg)),
                      temperature=0.02).to(device)
    model.train()
    fused = maybe_fuse(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, **({"fused": True} if device.type == "cuda" else {}))
    gen = torch.Generator().manual_seed(0)

    def inputs(n: int, s: int) -> dict:
        ids = torch.randint(5, VOCAB, (n, s), generator=gen)
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
        tt = torch.zeros(n, s, dtype=torch.long)
        if s > 2:
            tt[:, 2:] = 1  # "[CLS] [SEP] text [SEP]": text segment
        return {"input_ids": ids.to(device), "attention_mask": torch.ones(n, s, dtype=torch.long, device=device),
                "token_type_ids": tt.to(device), "num_tokens": n * s}  # the collator's count: no padding

    batches = [(inputs(Q, lq), inputs(Q * G, lp)) for _ in range(2)]

    step = optimizer_step(device, opt, lambda m, i: m(query=batches[i % 2][0], passage=batches[i % 2][1]).loss)

    for i in range(args.warmup):
        step(model, i)
    sec, iter_times = timed_loop(device, args.iters, lambda i: step(model, i))
    compiled_rows = training_variants(args, device, "biencoder step", model, step)
    fwd = encoder_forward_flops(enc_cfg, [lq] * Q) + encoder_forward_flops(enc_cfg, [lp] * (Q * G))
    fwd += 2 * Q * (Q * G) * enc_cfg["hidden_size"]  # score matrix
    flops = 3 * fwd
    tokens = float(Q * lq + Q * G * lp)
    row = rate_row("biencoder", f"BiEncoder step (fwd+bwd+AdamW){fused}", f"{Q} q x group {G}, q {lq} / p {lp}", Q, "query",
                   tokens, flops, sec, peak, {
                       "step_seconds": sec, "steps_per_s": 1 / sec, "passages_per_s": Q * G / sec,
                       "iteration_seconds": iter_times,
                       "peak_gpu_mem_gib": (torch.cuda.max_memory_allocated(device) / C.GIB) if device.type == "cuda" else None,
                   })
    rows = [row]
    for mode, backend, sec_c, compile_s in compiled_rows:
        what = (f"BiEncoder step{tag('default', backend)}" if mode == "eager"
                else f"BiEncoder step, torch.compile(model){tag(mode, backend)}") + fused
        rows.append(rate_row("biencoder", what,
                             f"{Q} q x group {G}, q {lq} / p {lp}", Q, "query", tokens, flops, sec_c, peak,
                             {"step_seconds": sec_c, "compile_seconds": compile_s}))
    del model, opt, batches
    return rows


# =============================================================================================
# (e)-(g) training steps on real lengths: padded batches against packed_training
def padded_vs_packed(args, device, peak, part: str, label: str, unit: str, items: float, shape: str,
                     tokens: float, flops: float, padding_fraction: float, lr: float,
                     build: Callable[[bool], torch.nn.Module],
                     loss: Callable[[torch.nn.Module, int], torch.Tensor],
                     lengths_note: str = ", real lengths",
                     grouped_loss: Callable[[torch.nn.Module, int], torch.Tensor] | None = None) -> list[dict]:
    """Time one training step (``loss(model, i)`` on batch ``i``, backward, AdamW) for the model
    ``build(packed)`` makes, padded and with ``packed_training`` (``--packed-compile 1``: also
    through ``torch.compile``); with ``grouped_loss`` (the same passages in length-grouped
    batches, as ``group_by_length`` draws them) also padded on those. The batches take turns, so
    each row reports the mean step time (the best is kept too)."""
    rows, secs = [], {}
    runs = [(False, loss, "padded (default)"), (True, loss, "packed_training")]
    if grouped_loss is not None:
        runs.insert(1, ("grouped", grouped_loss, "padded, group_by_length"))
    for packed, loss, name in runs:
        model = build(packed is True).to(device)
        model.train()
        suffix = maybe_fuse(args, model) + (set_train_attention(args, model) if packed is True else "")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                **({"fused": True} if device.type == "cuda" else {}))

        step = optimizer_step(device, opt, loss)
        variants = [("", model)]
        if args.packed_compile:  # torch.compile, default mode (no CUDA graphs: packed shapes vary)
            variants.append((", torch.compile", torch.compile(model)))
        for tag_c, m in variants:
            t0 = time.perf_counter()
            for i in range(max(args.warmup, 4 if tag_c else 0)):  # compiled: see every batch's shape first
                step(m, i)
            sync(device)
            compile_s = time.perf_counter() - t0
            sec, iter_times = timed_loop(device, args.iters, lambda i: step(m, i))
            mean = float(np.mean(iter_times))
            secs[(packed, tag_c)] = mean
            what = f"{label}{lengths_note}, {name}{suffix}{tag_c}"
            rows.append(rate_row(part, what, shape, items, unit, tokens, flops, mean, peak,
                                 {"step_seconds_mean": mean, "step_seconds_best": sec,
                                  "iteration_seconds": iter_times, "padding_fraction": padding_fraction,
                                  **({"compile_seconds": compile_s} if tag_c else {})}))
            if packed:
                rows[-1]["speedup_vs_padded"] = secs[(False, tag_c)] / mean
                print(f"   {name}{tag_c}: {secs[(False, tag_c)] / mean:.2f}x the padded step's rate", flush=True)
        del model, opt, variants
    return rows


# =============================================================================================
# (e) biencoder training on real passage lengths: padded batches against packed_training
def bench_biencoder_packed(args, device, size, work: Path, peak) -> list[dict]:
    """The biencoder step on MS MARCO-like lengths (~67 tokens, max 144), where padding each batch to
    its longest passage wastes compute: ``BiEncoder`` as the trainer runs it by default (padded)
    and with ``packed_training``. Both rows count the same FLOPs, those of the real tokens (what
    the packed encoder runs: its last layer on [CLS] rows only), so MFU is useful work."""
    from transformers import BertConfig, BertModel

    from simlm_core.modeling.biencoder import BiEncoder

    tok, words = make_tokenizer(work / "tok")
    Q, G, lq, lp, n_batches = args.bi_queries, args.bi_group, 32, 144, 4
    full = bool(args.bi_full_length)  # every passage fills p_max_len: no padding, MFU comparable with (c)
    passages = (make_passages(words, Q * G * n_batches, seed=3, mean_words=200, min_words=180, max_words=300)
                if full else make_passages(words, Q * G * n_batches, seed=3))
    queries = make_passages(words, Q * n_batches, seed=4, mean_words=6, min_words=2, max_words=20)
    multiple = 8 if device.type == "cuda" else None
    batches, q_lens, p_lens, padded_tokens = [], [], [], 0
    for b in range(n_batches):
        q = tok(queries[b * Q : (b + 1) * Q], max_length=lq, truncation=True, padding=True,
                pad_to_multiple_of=multiple, return_tensors="pt")
        p = tok([""] * (Q * G), text_pair=passages[b * Q * G : (b + 1) * Q * G], max_length=lp, truncation=True,
                padding=True, pad_to_multiple_of=multiple, return_tensors="pt")
        batches.append((on_device(with_token_count(q), device), on_device(with_token_count(p), device)))
        q_lens.append(q["attention_mask"].sum(1).tolist())
        p_lens.append(p["attention_mask"].sum(1).tolist())
        padded_tokens += q["input_ids"].numel() + p["input_ids"].numel()
    enc_cfg = SIZES[size]["enc"]
    score_f = 2 * Q * (Q * G) * enc_cfg["hidden_size"]
    flops = 3 * sum(packed_forward_flops(enc_cfg, ql) + packed_forward_flops(enc_cfg, pl) + score_f
                    for ql, pl in zip(q_lens, p_lens)) / n_batches
    tokens = sum(sum(ql) + sum(pl) for ql, pl in zip(q_lens, p_lens)) / n_batches
    shape = (f"{Q} q x group {G}, passages mean {np.mean(p_lens):.0f} / max {np.max(p_lens)} tok, "
             f"{100 * (1 - tokens * n_batches / padded_tokens):.0f}% of padded tokens are padding")
    print(f"   {shape}", flush=True)
    def build(packed: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        return BiEncoder(BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **enc_cfg),
                                   add_pooling_layer=False), temperature=0.02, packed_training=packed)

    def loss(m: torch.nn.Module, i: int) -> torch.Tensor:
        q, p = batches[i % n_batches]
        return m(query=q, passage=p).loss

    return padded_vs_packed(args, device, peak, "biencoder-packed", "BiEncoder step", "query", Q, shape, tokens,
                            flops, 1 - tokens * n_batches / padded_tokens, 2e-5, build, loss,
                            ", full-length passages" if full else ", real lengths")


# =============================================================================================
# (f) re-ranker training on real pair lengths: padded batches against packed_training
def bench_rerank_train_packed(args, device, size, work: Path, peak) -> list[dict]:
    """The cross-encoder's group-loss step (ELECTRA-base shape, pairs up to 192 tokens, MS MARCO-like
    lengths) as the re-ranker trainer runs it: padded (the default) and with ``packed_training``.
    Both rows count the FLOPs of the real tokens (the packed encoder's: last layer on [CLS] only)."""
    import copy

    from transformers import ElectraConfig, ElectraForSequenceClassification

    from simlm_core.modeling.reranker import pack_encoder_forward, tokenize_pairs
    from simlm_core.reranker_training import group_loss

    tok, words = make_tokenizer(work / "tok")
    Q, G, max_len, n_batches = args.bi_queries, args.bi_group, 192, 4
    passages = make_passages(words, Q * G * n_batches, seed=5)
    queries = make_passages(words, Q * n_batches, seed=6, mean_words=6, min_words=2, max_words=20)
    multiple = 8 if device.type == "cuda" else None
    batches, lengths, padded_tokens = [], [], 0
    for b in range(n_batches):
        qs = [queries[b * Q + i // G] for i in range(Q * G)]
        enc = dict(tokenize_pairs(tok, qs, passages[b * Q * G : (b + 1) * Q * G], max_len=max_len,
                                  pad_to_multiple_of=multiple))
        enc["labels"] = torch.zeros(Q, dtype=torch.long)
        batches.append(on_device(with_token_count(enc), device))
        lengths.append(enc["attention_mask"].sum(1).tolist())
        padded_tokens += enc["input_ids"].numel()
    enc_cfg = SIZES[size]["enc"]
    flops = 3 * sum(packed_forward_flops(enc_cfg, ls) for ls in lengths) / n_batches
    tokens = sum(sum(ls) for ls in lengths) / n_batches
    shape = (f"{Q} groups x {G} pairs, mean {np.mean(lengths):.0f} / max {np.max(lengths)} tok, "
             f"{100 * (1 - tokens * n_batches / padded_tokens):.0f}% of padded tokens are padding")
    print(f"   {shape}", flush=True)
    torch.manual_seed(0)
    base = ElectraForSequenceClassification(ElectraConfig(vocab_size=VOCAB, max_position_embeddings=512,
                                                          embedding_size=enc_cfg["hidden_size"], num_labels=1,
                                                          **enc_cfg))
    def build(packed: bool) -> torch.nn.Module:
        model = copy.deepcopy(base)
        if packed:
            pack_encoder_forward(model)
        return model

    def loss(m: torch.nn.Module, i: int) -> torch.Tensor:
        return group_loss(m, batches[i % n_batches], rdrop_alpha=0.0)["loss"]

    return padded_vs_packed(args, device, peak, "rerank-train-packed", "re-ranker group-loss step", "pair", Q * G,
                            shape, tokens, flops, 1 - tokens * n_batches / padded_tokens, 3e-5, build, loss)


# =============================================================================================
# (g) pre-training on real passage lengths: padded batches against packed_training
def bench_pretrain_packed(args, device, size, work: Path, peak) -> list[dict]:
    """The SimLM RLM step on MS MARCO-like passages (~67 tokens, max 144), padded per batch (the
    default) and with ``packed_training`` (encoder and decoder on real tokens; the frozen
    generator reads the padded batch in both). FLOPs as in (b), counted on the real tokens."""
    import copy

    from transformers import BertConfig, BertForMaskedLM, ElectraConfig, ElectraForMaskedLM

    from simlm_core.modeling.pretrain import GeneratorReplacer, SimLMForPretraining
    from simlm_core.pretraining import RLMCollator

    tok, words = make_tokenizer(work / "tok")
    B, max_len, n_batches = args.pretrain_batch, 144, 4
    examples = [{"title": "", "text": t} for t in make_passages(words, B * n_batches, seed=7)]
    collator = RLMCollator(tok, max_len=max_len, pad_to_multiple_of=8 if device.type == "cuda" else None)
    batches_cpu = [collator(examples[i * B : (i + 1) * B]) for i in range(n_batches)]
    batches = [on_device(b, device) for b in batches_cpu]
    lengths = [b["attention_mask"].sum(1).tolist() for b in batches_cpu]
    padded_tokens = sum(b["attention_mask"].numel() for b in batches_cpu)
    tokens = sum(sum(ls) for ls in lengths) / n_batches
    enc_cfg, gen_cfg = SIZES[size]["enc"], SIZES[size]["gen"]
    h = enc_cfg["hidden_size"]
    flops = 0.0
    for b, ls in zip(batches_cpu, lengths):
        n_lab = float((b["labels"] != -100).sum())
        enc_f = encoder_forward_flops(enc_cfg, ls) + mlm_head_flops(h, n_lab)
        dec_f = encoder_forward_flops(enc_cfg, ls, layers=2) + mlm_head_flops(h, n_lab)
        flops += 3 * (enc_f + dec_f) + 2 * generator_forward_flops(gen_cfg, ls)
    flops /= n_batches
    shape = (f"{B} psg, mean {np.mean(lengths):.0f} / max {np.max(lengths)} tok, "
             f"{100 * (1 - tokens * n_batches / padded_tokens):.0f}% of padded tokens are padding")
    print(f"   {shape}", flush=True)
    torch.manual_seed(0)
    encoder = BertForMaskedLM(BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **enc_cfg))
    generator = ElectraForMaskedLM(ElectraConfig(vocab_size=VOCAB, max_position_embeddings=512, **gen_cfg)).to(device)
    def build(packed: bool) -> torch.nn.Module:
        return SimLMForPretraining(copy.deepcopy(encoder), replacer=GeneratorReplacer(generator), decoder_layers=2,
                                   packed_training=packed)

    def loss(m: torch.nn.Module, i: int) -> torch.Tensor:
        return m(**batches[i % n_batches]).loss

    # group_by_length: the same passages, sorted by length (characters) into batches
    by_length = sorted(examples, key=lambda e: len(e["text"]), reverse=True)
    grouped_cpu = [collator(by_length[i * B : (i + 1) * B]) for i in range(n_batches)]
    grouped = [on_device(b, device) for b in grouped_cpu]
    grouped_padding = 1 - tokens * n_batches / sum(b["attention_mask"].numel() for b in grouped_cpu)
    print(f"   length-grouped batches: {100 * grouped_padding:.0f}% of padded tokens are padding", flush=True)

    def grouped_loss(m: torch.nn.Module, i: int) -> torch.Tensor:
        return m(**grouped[i % n_batches]).loss

    return padded_vs_packed(args, device, peak, "pretrain-packed", "SimLM RLM step", "psg", B, shape, tokens, flops,
                            1 - tokens * n_batches / padded_tokens, 3e-4, build, loss, grouped_loss=grouped_loss)


# =============================================================================================
# (d) re-ranker scoring
def bench_rerank(args, device, size, work: Path, peak) -> list[dict]:
    """``CrossEncoder.score_pairs`` (what re-ranking and teacher scoring call) against a bare
    forward loop over the same batches, tokenised beforehand and already on the device."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    from simlm_core.modeling.reranker import CrossEncoder, autocast_context, tokenize_pairs

    n, bs, max_len = args.rerank_pairs, args.rerank_batch, 192
    tok, words = make_tokenizer(work / "tok")
    passages = make_passages(words, n, seed=3)
    queries = make_passages(words, n, seed=4, mean_words=6.0, min_words=2, max_words=12)
    torch.manual_seed(0)
    enc_cfg = SIZES[size]["enc"]
    model = ElectraForSequenceClassification(ElectraConfig(vocab_size=VOCAB, max_position_embeddings=512,
                                                           embedding_size=enc_cfg["hidden_size"], num_labels=1,
                                                           **enc_cfg))
    scorer = CrossEncoder(model, tok)
    model.to(device).eval()
    # The same batches score_pairs builds: longest pairs (by characters) first, padded per batch.
    order = np.argsort([-(len(q) + len(p)) for q, p in zip(queries, passages)], kind="stable")
    pad_multiple = 8 if device.type == "cuda" else None
    batches = []
    for s in range(0, n, bs):
        idx = order[s : s + bs]
        enc = tokenize_pairs(tok, [queries[i] for i in idx], [passages[i] for i in idx], max_len=max_len,
                             pad_to_multiple_of=pad_multiple)
        batches.append({k: v.to(device) for k, v in enc.items()})
    widths = [b["input_ids"].shape[1] for b in batches for _ in range(b["input_ids"].shape[0])]
    flops = encoder_forward_flops(enc_cfg, widths)
    tokens = float(sum(widths))
    bf16 = device.type == "cuda"

    def bare() -> None:
        with torch.inference_mode(), autocast_context(device, bf16):
            outs = [model(**b).logits.view(-1).float() for b in batches]
        torch.cat(outs).cpu()

    def via_scorer(packed: bool) -> None:
        scorer.score_pairs(queries, passages, batch_size=bs, max_len=max_len, device=device, bf16=bf16,
                           show_progress=False, packed=packed)

    variants = {"bare": bare, "score_pairs": lambda: via_scorer(False), "score_pairs packed": lambda: via_scorer(True)}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, best of each
        for name, fn in variants.items():
            with Timer(device) as t:
                fn()
            times[name].append(t.best)
    best = {name: min(ts) for name, ts in times.items()}
    shape = f"{n:,} pairs, batch {bs}, max_len {max_len}, mean {tokens / n:.0f} tok (padded)"
    print(f"   score_pairs: {best['score_pairs'] / best['bare']:.3f}x the bare loop's time padded, "
          f"{best['score_pairs packed'] / best['bare']:.3f}x packed (the default)", flush=True)
    # FLOPs of the padded batches for every row, so TFLOP/s compares like with like (packed runs fewer)
    return [
        rate_row("rerank", "bare HF cross-encoder loop (ELECTRA-base shape)", shape, n, "pair", tokens, flops,
                 best["bare"], peak, {"times": times}),
        rate_row("rerank", "simlm_core CrossEncoder.score_pairs(packed=False)", shape, n, "pair", tokens, flops,
                 best["score_pairs"], peak, {"overhead_vs_bare": best["score_pairs"] / best["bare"]}),
        rate_row("rerank", "simlm_core CrossEncoder.score_pairs (packed, the default)", shape, n, "pair", tokens,
                 flops, best["score_pairs packed"], peak,
                 {"overhead_vs_bare": best["score_pairs packed"] / best["bare"]}),
    ]


PARTS = {"encode": bench_encode, "pretrain": bench_pretrain, "biencoder": bench_biencoder, "rerank": bench_rerank,
         "biencoder-packed": bench_biencoder_packed, "rerank-train-packed": bench_rerank_train_packed,
         "pretrain-packed": bench_pretrain_packed}


# =============================================================================================
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model-size", default="base", choices=list(SIZES))
    ap.add_argument("--parts", default="encode,rerank,pretrain,biencoder")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (dense bf16)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="encode: interleaved repeats, best kept (cuda 2, cpu 3)")
    ap.add_argument("--chunk-rows", type=int, default=None, help="encode_corpus_shard chunk_rows (default: cuda n/4, cpu 50,000)")
    ap.add_argument("--variants", type=int, default=1,
                    help="1: on cuda also time bf16 weights and torch.compile variants; 2: on CPU too (smoke test); 0: off")
    ap.add_argument("--compile-modes", default="default",
                    help="comma list of torch.compile modes for the compiled variants: default, reduce-overhead, "
                         "max-autotune, max-autotune-no-cudagraphs")
    ap.add_argument("--encode-pipeline", type=int, default=1,
                    help="encode: also time encode_texts and encode_corpus_shard (0: the bare loops only)")
    ap.add_argument("--sdpa-backends", default="default",
                    help="comma list of attention kernels for the bf16/compiled variants: default (torch's "
                         "choice), cudnn, efficient, flash (no padding mask), math")
    ap.add_argument("--packed", type=int, default=1,
                    help="encode variants: also the padding-free encoder (simlm_core.modeling.packed) (0: off)")
    ap.add_argument("--packed-attention", default="auto",
                    help="comma list of the packed encoder's attention kernels: auto (varlen on CUDA), varlen, "
                         "triton (simlm_core.modeling.packed_attention), padded")
    ap.add_argument("--triton-blocks", default=",".join(map(str, DEFAULT_BLOCKS)),
                    help="the Triton attention kernel's BLOCK_M,BLOCK_N,heads per program,warps")
    ap.add_argument("--train-attention", default="auto", choices=["auto", "padded", "triton"],
                    help="packed_training rows: the packed encoder's attention (auto: our Triton kernel on CUDA)")
    ap.add_argument("--packed-compile", type=int, default=0,
                    help="padded-vs-packed training parts: also time each model through torch.compile")
    ap.add_argument("--bi-full-length", type=int, default=0,
                    help="biencoder-packed: passages that fill 144 tokens (no padding), comparable with 'biencoder'")
    ap.add_argument("--fused-attention", type=int, default=0,
                    help="training parts: attention on our Triton training kernel (the fused_attention setting)")
    ap.add_argument("--fused-norm", type=int, default=0,
                    help="training parts: dropout-add-LayerNorm on the fused Triton kernel (the fused_norm setting)")
    ap.add_argument("--profile", type=int, default=0,
                    help="cuda: print this many top kernels (by device time) of each compiled variant (0: off)")
    ap.add_argument("--cpu-bf16-probe", type=int, default=1, help="cpu: also time the bare loop under bf16 autocast (0: off)")
    for key in DEFAULTS:
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/model_throughput-<device>.json)")
    args = ap.parse_args()

    device = resolve(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    col = 0 if device.type == "cuda" else (1 if args.model_size == "base" else 2)
    for key, vals in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, vals[col])
    if args.repeats is None:
        args.repeats = 2 if device.type == "cuda" else 3
    # TF32 left at torch's default, as in the pipeline (bf16 autocast does the heavy matmuls).
    peak, peak_note = peak_tflops(device, args.peak_tflops)
    import transformers  # noqa: F401  (for the versions in machine_info)

    info = C.machine_info(device.type)
    print(f"machine: {C.machine_line(info)}")
    print(f"device {device}, model {args.model_size}, torch threads {torch.get_num_threads()}, peak "
          f"{peak if peak else '-'} TFLOP/s ({peak_note})")
    rows: list[dict] = []
    errors: dict[str, str] = {}
    t_all = time.perf_counter()
    C.SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        print(f"-- {part} ...", flush=True)
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=C.SCRATCH_DIR, prefix=f"mt-{part}-") as work:
                new = PARTS[part](args, device, args.model_size, Path(work), peak)
            rows += new
            for r in new:
                print(f"   {r['what']}: {r['items_per_s']:.1f} {r['unit']}/s, {r['tokens_per_s']:.0f} tok/s, "
                      f"{r['gflops_per_s']:.1f} GFLOP/s" + (f", MFU {100 * r['mfu']:.1f}%" if r['mfu'] else ""), flush=True)
        except Exception as exc:  # one part failing must not hide the others
            errors[part] = "".join(traceback.format_exception(exc))[-3000:]
            print(f"   FAILED: {exc!r}", flush=True)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    gpu = device.type == "cuda"
    headers = ["part", "what", "shape", "items/s", "tokens/s", "TFLOP/s" if gpu else "GFLOP/s",
               "MFU %" if peak else "overhead x"]
    table_rows = []
    for r in rows:
        last = 100 * r["mfu"] if peak and r.get("mfu") is not None else r.get("overhead_vs_bare")
        table_rows.append([r["part"], r["what"], r["shape"], f"{C.fmt(r['items_per_s'])} {r['unit']}/s",
                           r["tokens_per_s"], r["tflops_per_s"] if gpu else r["gflops_per_s"], last])
    print(C.table(headers, table_rows, title=f"== model throughput on {info.get('gpu_name') or info['cpu_model']} "
                                             f"({args.model_size}; {peak_note})"))
    for r in rows:
        if r.get("tokenize_passages_per_s") is not None:
            print(f"tokenisation alone: {r['tokenize_passages_per_s']:.0f} psg/s vs bare model "
                  f"{r['items_per_s']:.0f} psg/s (if lower, encoding is host-bound)")
        if r.get("speedup_vs_fp32_bare") is not None:
            print(f"probe: the bare loop under CPU bf16 autocast runs at {r['speedup_vs_fp32_bare']:.2f}x the fp32 "
                  f"speed (encode.py uses fp32 on CPU)")
        if r.get("overhead_vs_bare") is not None:
            print(f"overhead {r['what']}: {r['overhead_vs_bare']:.3f}x the bare loop (target <= 1.1x on CPU)")
        if r["part"] == "pretrain" and "collator_seconds_per_batch" in r:
            print(f"RLM collator on CPU: {r['collator_seconds_per_batch'] * 1e3:.0f} ms per batch of "
                  f"{args.pretrain_batch} ({r['collator_passages_per_s']:.0f} psg/s per worker; "
                  f"model step {r['step_seconds'] * 1e3:.0f} ms)")
    print("FLOPs: forward = 2*T*L*(4h^2+2hI) + sum_seq 4*L*s^2*h (+ 2*n*(h^2+hV) per MLM head); "
          "training = 3 x forward (frozen generator: 1 x); embeddings/norms/optimizer not counted")
    for part, err in errors.items():
        print(f"\n{part} FAILED:\n{err}")
    payload = {
        "benchmark": "model_throughput", "date": C.now_iso(), "machine": info, "device": str(device),
        "loadavg_end": C.loadavg(), "total_seconds": round(time.perf_counter() - t_all, 1),
        "settings": vars(args), "peak_tflops": peak, "peak_note": peak_note,
        "flops_formula": "forward = 2*T*L*(4h^2+2hI) + sum_seq 4*L*s^2*h + MLM heads 2*n*(h^2+hV); "
                         "training = 3x forward of trained parts + 1x frozen generator forward",
        "model_shapes": SIZES[args.model_size], "results": rows, "errors": errors,
    }
    path = C.write_results("model_throughput", device.type, payload, Path(args.out) if args.out else None)
    print(f"\nresults: {path} ({time.perf_counter() - t_all:.0f} s)")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
