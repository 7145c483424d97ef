"""Adapter: Lucene index + a split's queries -> BM25 run Parquet."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.bm25 import search  # noqa: E402

p = snakemake.params  # noqa: F821
stats = search(
    snakemake.input.index,  # noqa: F821
    snakemake.input.queries,  # noqa: F821
    snakemake.output.run,  # noqa: F821
    k1=p.k1,
    b=p.b,
    hits=p.hits,
    threads=snakemake.threads,  # noqa: F821
    remove_query=p.remove_query,
    heap=p.heap,
)
print(stats)
