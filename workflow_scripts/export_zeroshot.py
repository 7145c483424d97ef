"""Adapter: the initial encoder, untrained, as a biencoder checkpoint (system `zeroshot`), so the
report shows what fine-tuning adds to a pre-trained encoder."""
import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from simlm_core.io import atomic_dir  # noqa: E402
from simlm_core.modeling.biencoder import BiEncoder  # noqa: E402

p = snakemake.params  # noqa: F821
model = BiEncoder.from_pretrained(
    p.encoder, pooling=p.pooling, normalize=p.normalize, temperature=p.temperature,
    passage_format=p.passage_format, q_max_len=p.q_max_len, p_max_len=p.p_max_len,
)
with atomic_dir(snakemake.output[0]) as tmp:  # noqa: F821
    model.save_pretrained(tmp)
print(f"exported {p.encoder} -> {snakemake.output[0]}")  # noqa: F821
