"""Adapter: every metrics JSON (+ runs for recall curves, + benchmark files) -> the report."""
import json
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.report import build_report, read_snakemake_benchmark  # noqa: E402

inp, p = snakemake.input, snakemake.params  # noqa: F821
entries = []
for path in inp.metrics:
    m = json.loads(Path(path).read_text())
    entries.append({"system": m["system"], "split": m["split"], "metrics": m["metrics"], "run_depth": m.get("run_depth")})
curves = [
    {"system": s, "split": sp, "run_path": str(Path(p.benchmarks_dir).parent / s / "runs" / f"{sp}.parquet"),
     "qrels_path": str(Path(p.benchmarks_dir).parent / "data" / "qrels" / f"{sp}.parquet")}
    for s in p.systems for sp in p.splits
]
costs = [
    {"rule": f.stem, **read_snakemake_benchmark(f)}
    for f in sorted(Path(p.benchmarks_dir).glob("*.tsv"))
]
build_report(entries, Path(snakemake.output.csv).parent, title=p.title,  # noqa: F821
             reference=p.reference or None, recall_curves=curves, costs=costs)
