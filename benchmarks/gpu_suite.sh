#!/usr/bin/env bash
# Every GPU benchmark in one go, each part in its own process with its own time cap, so one slow
# or failing part cannot take the others' figures with it.
#   bash benchmarks/gpu_suite.sh [OUT_DIR]     (default benchmarks/results; about 8 min on an H200)
# Environment:
#   PARTS          parts in order (default "shard encode biencoder pretrain rerank"); also "encode-bare":
#                  the encoder's bare loops only (bf16 weights, compiled), without the pipeline
#                  paths. "shard" is shard_profile.py: encode_corpus_shard timed and profiled.
#                  "attention" is attention_kernels.py; its best Triton blocks go to later parts.
#                  "biencoder-packed": the biencoder step on real passage lengths, padded vs packed_training.
#                  "norm" is norm_kernels.py: dropout-add-LayerNorm, torch vs inductor vs our fused kernel.
#                  "kernels": tests/triton_interpreter_checks.py on the GPU (our kernels against torch, compiled).
#                  "nosync": tests/test_no_sync.py -m gpu: each stage's training step (padded, packed, fused
#                  kernels on and off) in bf16 under torch.cuda.set_sync_debug_mode("error").
#                  A training part with "-fusednorm", "-fusedattn" or "-fused" appended (e.g. "biencoder-fused")
#                  runs with --fused-norm 1, --fused-attention 1 or both (our Triton training kernels).
#   PACKED_ATTENTION  the packed encoder's attention kernels to time (default "auto"; e.g. "varlen,triton")
#   TRITON_BLOCKS  the Triton attention kernel's blocks (default: the "attention" part's best)
#   COMPILE_MODES  torch.compile modes of the compiled variants (default "default"); per part:
#                  MODES_encode, MODES_encode_bare, MODES_biencoder, MODES_pretrain
#   PROFILE        N > 0: print the top N kernels of each compiled variant
#   CAP_<part>     seconds for a part (defaults below); SKIP_PROBE, SKIP_FAISS: leave those out
#   EXTRA_<part>   more model_throughput.py arguments for a part (e.g. EXTRA_encode_bare="--encode-passages 32768");
#                  EXTRA_attention: attention_kernels.py's (e.g. "--parts train": the training kernels only)
# Each part's full output is kept in OUT_DIR/model_throughput-cuda-<part>.log.
set -u
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
[ -n "${SKIP_PROBE:-}" ] || timeout 60 python3 - <<'PY'
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
for part in ${PARTS:-shard encode biencoder pretrain rerank}; do
  key=${part//-/_}
  if [ "$part" = attention ]; then  # attention kernels alone; its best Triton blocks feed the encode parts
    cap="${CAP_attention:-240}"
    echo "== attention (cap ${cap}s)"
    # shellcheck disable=SC2086  # EXTRA_attention is a word list (e.g. "--parts train")
    timeout "$cap" python3 benchmarks/attention_kernels.py --device cuda ${EXTRA_attention:-} --out "$out/attention_kernels-cuda.json" \
      > "$out/attention_kernels-cuda.log" 2>&1
    echo "   exit $?"
    grep "^   \|^best" "$out/attention_kernels-cuda.log" | head -60
    best=$(sed -n 's/^best triton blocks: \([0-9,]*\).*/\1/p' "$out/attention_kernels-cuda.log")
    [ -n "$best" ] && TRITON_BLOCKS="${TRITON_BLOCKS:-$best}"
    continue
  fi
  if [ "$part" = kernels ]; then  # the interpreter tests' kernel checks, on the compiled kernels
    cap="${CAP_kernels:-240}"
    echo "== kernels (cap ${cap}s)"
    timeout "$cap" python3 tests/triton_interpreter_checks.py --device cuda kernel encoder fused_norm attention_train \
      > "$out/kernel_checks-cuda.json" 2> "$out/kernel_checks-cuda.log"
    echo "   exit $?"
    # one JSON line per finished part, then all of them (a capped run leaves the parts it finished)
    python3 -c "import json, sys; print(json.dumps(json.loads(open(sys.argv[1]).read().splitlines()[-1]), indent=1)[:6000])" \
      "$out/kernel_checks-cuda.json" || tail -20 "$out/kernel_checks-cuda.log"
    grep "^\[checks\]" "$out/kernel_checks-cuda.log"
    continue
  fi
  if [ "$part" = norm ]; then
    cap="${CAP_norm:-90}"
    echo "== norm (cap ${cap}s)"
    timeout "$cap" python3 benchmarks/norm_kernels.py --device cuda --out "$out/norm_kernels-cuda.json" \
      > "$out/norm_kernels-cuda.log" 2>&1
    echo "   exit $?"
    grep "^   \|^fused" "$out/norm_kernels-cuda.log"
    continue
  fi
  if [ "$part" = nosync ]; then  # every stage's training step under CUDA's sync debug mode "error"
    cap="${CAP_nosync:-180}"
    echo "== nosync (cap ${cap}s)"
    if python3 -c "import pytest" 2>/dev/null; then
      timeout "$cap" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_no_sync.py > "$out/nosync-cuda.log" 2>&1
      echo "   exit $?"
      grep "passed\|failed\|Error" "$out/nosync-cuda.log" | tail -20
    else
      echo "   pytest is not installed here: skipped"
    fi
    continue
  fi
  if [ "$part" = shard ]; then
    cap_var="CAP_shard"; cap="${!cap_var:-120}"
    echo "== shard (cap ${cap}s)"
    timeout "$cap" python3 benchmarks/shard_profile.py --device cuda ${EXTRA_shard:-} > "$out/shard_profile-cuda.log" 2>&1
    echo "   exit $?"
    grep "psg/s" "$out/shard_profile-cuda.log"
    continue
  fi
  fused=""  # suffixes: -fusednorm, -fusedattn, -fused (both kernels)
  base=$part
  case $part in
    *-fusednorm) fused="--fused-norm 1"; base=${part%-fusednorm};;
    *-fusedattn) fused="--fused-attention 1"; base=${part%-fusedattn};;
    *-fused) fused="--fused-norm 1 --fused-attention 1"; base=${part%-fused};;
  esac
  case $base in
    encode) cap=200; args="--parts encode";;
    encode-bare) cap=150; args="--parts encode --encode-pipeline 0";;
    biencoder) cap=140; args="--parts biencoder";;
    biencoder-packed) cap=120; args="--parts biencoder-packed";;
    rerank-train-packed) cap=120; args="--parts rerank-train-packed";;
    pretrain-packed) cap=120; args="--parts pretrain-packed";;
    pretrain) cap=150; args="--parts pretrain";;
    rerank) cap=90; args="--parts rerank";;
    *) echo "unknown part $part"; continue;;
  esac
  base_key=${base//-/_}  # a "-fused" part takes its base part's CAP_/MODES_/EXTRA_ unless it has its own
  cap_var="CAP_$key"; modes_var="MODES_$key"; extra_var="EXTRA_$key"
  base_cap="CAP_$base_key"; base_modes="MODES_$base_key"; base_extra="EXTRA_$base_key"
  cap="${!cap_var:-${!base_cap:-$cap}}"; modes="${!modes_var:-${!base_modes:-${COMPILE_MODES:-default}}}"
  args="$args $fused"
  echo "== $part (cap ${cap}s, compile modes $modes)"
  # shellcheck disable=SC2086  # $args and EXTRA_* are word lists
  timeout "$cap" python3 benchmarks/model_throughput.py --device cuda $args --compile-modes "$modes" \
    --profile "${PROFILE:-0}" --packed-attention "${PACKED_ATTENTION:-auto}" \
    ${TRITON_BLOCKS:+--triton-blocks "$TRITON_BLOCKS"} ${!extra_var:-${!base_extra:-}} --out "$out/model_throughput-cuda-$part.json" \
    > "$out/model_throughput-cuda-$part.log" 2>&1
  echo "   exit $?"
  grep -v "^|--\|Loading weights\|Writing model" "$out/model_throughput-cuda-$part.log" | grep "^   \|^| \|FAILED\|Error" | grep -v "^   profile\|^  *[-=]\{5\}" | head -40
done
