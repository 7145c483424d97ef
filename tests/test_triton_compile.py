"""Our Triton kernels build for real GPUs (sm_90: H100/H200, sm_80: A100) with their default tiles,
without register spills and with room for several programs per SM.

No GPU is needed: Triton's wheel carries the NVIDIA backend and ptxas (benchmarks/triton_compile.py).
This catches what the CPU interpreter cannot: code the GPU compiler rejects, and tiles whose
register or shared-memory needs would make a kernel slow.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile.py"
KERNELS = {"packed_attention_fwd", "attention_train_fwd", "attention_train_bwd", "dropout_add_layer_norm_fwd",
           "dropout_add_layer_norm_bwd"}


@pytest.mark.parametrize("arch", [90, 80])
def test_default_tiles_compile_without_spills(arch, tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arch", str(arch), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["failures"] == {}
    rows = {r["kernel"]: r for r in result["results"]}
    assert set(rows) == KERNELS
    for name, row in rows.items():
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, (name, row)
        # attention: at least 3 programs (12 warps) per SM; the streaming norm kernels: at least 5
        assert row["programs_per_sm"] >= (3 if "attention" in name else 5), (name, row)
