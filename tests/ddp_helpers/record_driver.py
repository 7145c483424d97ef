"""Run the retriever-training driver with a recorder attached (used by ``tests/test_ddp.py``).

    torchrun --standalone --nproc_per_node 2 tests/ddp_helpers/record_driver.py RECORD_DIR --args-json '{...}'

This is exactly ``simlm_core.drivers.train_biencoder.main`` plus a recorder: every rank appends
JSON lines to ``RECORD_DIR/rank{RANK}.jsonl``:

* ``{"event": "step", ...}`` for every training forward pass: the batch's query texts (decoded
  from the token ids the model received), the loss this rank computed, and the shape of its
  score matrix (how many passages its queries were scored against);
* ``{"event": "save"}`` whenever ``BiEncoder.save_pretrained`` runs (the final model).

Nothing about training changes: the wrappers call the original methods and only read results.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    record_dir = Path(sys.argv[1])
    record_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    log_path = record_dir / f"rank{rank}.jsonl"

    from simlm_core.drivers import train_biencoder as driver
    from simlm_core.modeling.biencoder import BiEncoder

    def emit(**event) -> None:
        event["rank"] = rank
        with log_path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    original_forward = BiEncoder.forward
    original_save = BiEncoder.save_pretrained

    def forward(self, query=None, passage=None, teacher_scores=None):
        out = original_forward(self, query=query, passage=passage, teacher_scores=teacher_scores)
        if self.training and out.loss is not None:
            emit(
                event="step",
                queries=self.tokenizer.batch_decode(query["input_ids"], skip_special_tokens=True),
                loss=float(out.loss.detach()),
                scores_shape=list(out.scores.shape),
                num_passages=int(passage["input_ids"].shape[0]),
            )
        return out

    def save_pretrained(self, *args, **kwargs):
        emit(event="save")
        return original_save(self, *args, **kwargs)

    BiEncoder.forward = forward
    BiEncoder.save_pretrained = save_pretrained
    return driver.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
