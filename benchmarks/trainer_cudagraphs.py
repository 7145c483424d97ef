"""Pre-training through the real Trainer path with ``torch_compile_mode``: correct and how fast.

    python benchmarks/trainer_cudagraphs.py --device cuda [--steps 60] [--modes default,reduce-overhead]

1. **Gradient accumulation under CUDA graphs.** A CUDA-graph replay reuses its output buffers, and
   the accumulated ``.grad`` of two micro-batches is where that would bite. A small SimLM model
   (dropout off, plain MLM: no random draws) runs two forward/backward passes per mode; its
   accumulated gradients are compared with eager ones (cosine and relative norm difference).
2. **Throughput.** ``RLMTrainer`` (what ``simlm_core.pretraining.pretrain`` builds) on a BERT-base
   encoder with an ELECTRA-base-generator-shaped frozen generator, batch 64 x 144, bf16, in each
   compile mode; passages/s over the steps after the first ``--warmup`` (compilation excluded),
   with the losses logged, so modes can be compared step for step.

CPU: ``--model-size tiny`` (no CUDA graphs there: the modes only compile).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)
import model_throughput as M  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


def grad_accumulation_check(device: torch.device, modes: list[str]) -> list[dict]:
    from transformers import BertConfig, BertForMaskedLM

    from simlm_core.modeling.pretrain import SimLMForPretraining
    from simlm_core.training import mode_uses_cuda_graphs

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=M.VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = SimLMForPretraining(BertForMaskedLM(cfg), replacer=None, decoder_layers=2,
                                label_positions="all").to(device)
    gen = torch.Generator().manual_seed(1)

    def batch() -> dict:
        ids = torch.randint(5, M.VOCAB, (16, 64), generator=gen)
        ids[:, 0], ids[:, -1] = 2, 3
        masked = (torch.rand(ids.shape, generator=gen) < 0.3) & (ids > 3)
        labels = ids.masked_fill(~masked, -100)
        enc = ids.masked_fill(masked, 4)
        return {k: v.to(device) for k, v in {
            "encoder_input_ids": enc, "decoder_input_ids": enc, "attention_mask": torch.ones_like(ids),
            "labels": labels, "encoder_mlm_mask": masked, "decoder_mlm_mask": masked}.items()}

    batches = [batch() for _ in range(2)]

    def accumulated(m, mark_steps: bool = False) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        for b in batches:  # two micro-batches, as gradient_accumulation_steps=2
            if mark_steps:  # what RLMTrainer.compute_loss does under CUDA graphs
                torch.compiler.cudagraph_mark_step_begin()
            with M.autocast(device):
                loss = m(**b).loss
            loss.backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    ref = accumulated(model)
    rows = []
    for mode in modes:
        torch._dynamo.reset()
        m = torch.compile(model, mode=None if mode == "default" else mode)
        for _ in range(3):  # records / warms the graphs; the last call is the one compared
            got = accumulated(m, mark_steps=mode_uses_cuda_graphs(mode))
        cos = float(torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=0))
        rel = float((got - ref).norm() / ref.norm())
        print(f"   accumulated gradients, 2 micro-batches, compile mode {mode}: cosine {cos:.6f}, "
              f"relative difference {rel:.2e} (vs eager)", flush=True)
        rows.append({"mode": mode, "cosine_vs_eager": cos, "relative_difference": rel})
    torch._dynamo.reset()
    return rows


def trainer_throughput(args, device: torch.device, work: Path, mode: str) -> dict:
    from transformers import (BertConfig, BertForMaskedLM, ElectraConfig, ElectraForMaskedLM,
                              TrainerCallback, set_seed)

    from simlm_core.pretraining import (PretrainArgs, RLMCollator, RLMTrainer, _passages,
                                        build_pretrain_model)
    from simlm_core.training import to_training_arguments, uses_cuda_graphs

    tok, words = M.make_tokenizer(work / "tok")
    enc_dir, gen_dir = work / "encoder", work / "generator"
    if not enc_dir.exists():
        torch.manual_seed(0)
        size = M.SIZES[args.model_size]
        BertForMaskedLM(BertConfig(vocab_size=M.VOCAB, max_position_embeddings=512, **size["enc"])).save_pretrained(enc_dir)
        tok.save_pretrained(enc_dir)
        ElectraForMaskedLM(ElectraConfig(vocab_size=M.VOCAB, max_position_embeddings=512, **size["gen"])).save_pretrained(gen_dir)
        n = args.batch * (args.steps + 2)
        texts = M.make_passages(words, n, seed=2, mean_words=200, min_words=180, max_words=300)
        pq.write_table(pa.table({"pid": [str(i) for i in range(n)], "title": [""] * n, "text": texts}),
                       work / "corpus.parquet")
    pargs = PretrainArgs(
        corpus_path=str(work / "corpus.parquet"), model_name_or_path=str(enc_dir), generator=str(gen_dir),
        output_dir=str(work / f"out-{mode}"), work_dir=str(work / f"work-{mode}"), max_len=144,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        warmup_steps=10, logging_steps=10, save_steps=10**6, bf16=device.type == "cuda",
        torch_compile_mode=mode, dataloader_num_workers=args.workers, disable_tqdm=True)
    set_seed(pargs.seed)
    training_args = to_training_arguments(pargs)
    model = build_pretrain_model(pargs, tok)
    collator = RLMCollator(tok, max_len=144, pad_to_multiple_of=8 if device.type == "cuda" else None,
                           pad_to_max_len=uses_cuda_graphs(pargs))
    times: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[state.global_step] = time.perf_counter()

    trainer = RLMTrainer(model=model, args=training_args, train_dataset=_passages(pargs, training_args),
                         data_collator=collator, processing_class=tok, callbacks=[StepClock()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    steps = args.steps - args.warmup
    sec = (times[args.steps] - times[args.warmup]) / steps
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    print(f"   Trainer, compile mode {mode}: {sec * 1e3:.1f} ms/step, {args.batch / sec:,.0f} psg/s over steps "
          f"{args.warmup}-{args.steps} (run {total:.0f} s incl. compile); losses {losses}", flush=True)
    row = {"mode": mode, "step_seconds": sec, "passages_per_s": args.batch / sec, "run_seconds": total,
           "losses": losses, "cuda_graphs": uses_cuda_graphs(pargs),
           "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / C.GIB if device.type == "cuda" else None}
    del trainer, model
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model-size", default="base", choices=list(M.SIZES))
    ap.add_argument("--modes", default="default,reduce-overhead")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the timing (compilation)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4, help="dataloader workers (the collator is CPU work)")
    ap.add_argument("--parts", default="grads,trainer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = M.resolve(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = C.machine_info(device.type)
    print(f"machine: {C.machine_line(info)}", flush=True)
    payload: dict = {"benchmark": "trainer_cudagraphs", "date": C.now_iso(), "machine": info,
                     "settings": vars(args), "grads": [], "trainer": [], "errors": {}}
    C.SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=C.SCRATCH_DIR, prefix="trainer-cg-") as tmp:
        if "grads" in args.parts:
            try:
                payload["grads"] = grad_accumulation_check(device, modes)
            except Exception as exc:
                payload["errors"]["grads"] = "".join(traceback.format_exception(exc))[-3000:]
                print(f"   grads FAILED: {payload['errors']['grads']}", flush=True)
        if "trainer" in args.parts:
            for mode in modes:
                try:
                    payload["trainer"].append(trainer_throughput(args, device, Path(tmp), mode))
                except Exception as exc:
                    payload["errors"][f"trainer-{mode}"] = "".join(traceback.format_exception(exc))[-3000:]
                    print(f"   trainer {mode} FAILED: {payload['errors'][f'trainer-{mode}']}", flush=True)
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
    path = C.write_results("trainer_cudagraphs", device.type, payload, Path(args.out) if args.out else None)
    print(f"results: {path}")
    print(json.dumps({k: payload[k] for k in ("grads", "trainer")}, default=str)[:3000])
    if payload["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
