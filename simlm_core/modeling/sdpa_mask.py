"""The padding mask a BERT / ELECTRA on SDPA takes without a host-device sync.

Given a 2D ``[N, L]`` attention mask, transformers checks whether the batch has any padding at
all (``mask.all()``, to drop the mask and let SDPA pick flash attention): a read-back of the
device on every forward, which stalls the host until the GPU has caught up. A 4D mask is taken
as it is. :func:`key_padding_mask` gives that 4D mask -- ``[N, 1, 1, L]`` booleans, which SDPA
broadcasts over heads and queries: the same masking as transformers' (keys only, so padding rows
still attend to their text and nothing is NaN). Only for the encoders whose attention we know
reads a boolean 4D mask this way; for any other model or attention implementation it returns
None and transformers builds the mask as usual.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["key_padding_mask"]

_ENCODERS = ("bert", "electra")


def key_padding_mask(config: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``attention_mask`` (``[N, L]``, 1 = real token) as SDPA's ``[N, 1, 1, L]`` boolean key mask,
    for a BERT / ELECTRA encoder config on SDPA; None otherwise (or when there is no mask)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    if getattr(config, "model_type", None) not in _ENCODERS or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    if getattr(config, "is_decoder", False):  # causal: transformers must combine the two masks
        return None
    return attention_mask.bool()[:, None, None, :]
