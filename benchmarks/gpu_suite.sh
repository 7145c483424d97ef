#!/usr/bin/env bash
# Every GPU benchmark in one go, each part in its own process with its own time cap, so one slow
# or failing part cannot take the others' figures with it.
#   bash benchmarks/gpu_suite.sh [OUT_DIR]     (default benchmarks/results; about 8 min on an H200)
set -u
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
python3 - <<'PY'
# Host-side probe: the Rust tokenizer's batch call, and how many cores it may use.
import os, sys, time
sys.path.insert(0, "benchmarks")
import model_throughput as M
from pathlib import Path
tok, words = M.make_tokenizer(Path("/tmp/gpu_suite_tok"))
texts = M.make_passages(words, 65536, seed=1)
print(f"cpus {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}, "
      f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')}")
for label, kw in [("lists", {}), ("no attention mask", {"return_attention_mask": False})]:
    t = time.perf_counter()
    tok([""] * len(texts), text_pair=texts, max_length=144, truncation=True, **kw)
    print(f"tokenise 65,536 passages ({label}): {len(texts) / (time.perf_counter() - t):,.0f} psg/s")
bt = tok.backend_tokenizer
bt.enable_truncation(144)
t = time.perf_counter()
enc = bt.encode_batch(list(zip([""] * len(texts), texts)))
t1 = time.perf_counter()
ids = [e.ids for e in enc]
t2 = time.perf_counter()
print(f"rust encode_batch {len(texts) / (t1 - t):,.0f} psg/s; .ids to Python lists {len(texts) / (t2 - t1):,.0f} psg/s")
PY
[ -n "${SKIP_FAISS:-}" ] || timeout 80 python3 benchmarks/faiss_search.py --device cuda --out "$out/faiss_search-cuda.json" 2>&1 | tail -25
for part in ${PARTS:-encode biencoder pretrain}; do
  case $part in encode) cap=200;; biencoder) cap=140;; pretrain) cap=150;; esac
  echo "== $part (cap ${cap}s)"
  timeout $cap python3 benchmarks/model_throughput.py --device cuda --parts $part \
    --out "$out/model_throughput-cuda-$part.json" 2>&1 | grep -v "^|--" | tail -22
done
