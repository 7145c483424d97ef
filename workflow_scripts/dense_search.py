"""Adapter: a dense system's checkpoint + index + a split's queries -> run Parquet."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.gpu_slots import claim_for_this_process  # noqa: E402

# before torch and faiss see the GPUs: this job's own, on a machine shared with other GPU jobs
claim_for_this_process(snakemake.resources.gpu)  # noqa: F821

from simlm_core.encode import encode_queries  # noqa: E402
from simlm_core.index import search  # noqa: E402
from simlm_core.io import write_run  # noqa: E402

inp, p = snakemake.input, snakemake.params  # noqa: F821
qids, embeddings = encode_queries(inp.model, inp.queries, batch_size=p.batch_size, max_len=p.q_max_len)
run = search(inp.index, inp.ids, embeddings, qids, top_k=p.top_k)
write_run(run, snakemake.output.run)  # noqa: F821
print(f"{len(qids)} queries, {len(run)} rows")
