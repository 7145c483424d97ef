"""The attention mask to hand a transformers encoder so that it never waits for the device.

Given a 2D ``[N, L]`` attention mask, transformers checks whether the batch has any padding at
all (``mask.all()``, to drop the mask and let SDPA pick flash attention): a read-back of the
device on every forward, which stalls the host until the GPU has caught up. It takes a 4D mask
as it is, and no mask as "no padding". :func:`encoder_attention_mask` gives one of those:

- no mask, when the host already knows the batch has no padding (a collator's ``num_tokens``
  equals the batch's size): transformers' own choice after its check, flash attention allowed
  (eager only: under ``torch.compile`` the count is not read, so it never recompiles for one);
- else, for BERT / ELECTRA on SDPA, ``[N, 1, 1, L]`` booleans (:func:`key_padding_mask`), which
  SDPA broadcasts over heads and queries: the same masking as transformers' (keys only, so
  padding rows still attend to their text and nothing is NaN);
- else the 2D mask unchanged, and transformers builds its mask as usual.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["encoder_attention_mask", "key_padding_mask", "with_encoder_mask"]

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


def encoder_attention_mask(config: Any, attention_mask: torch.Tensor | None,
                           num_tokens: int | None = None) -> torch.Tensor | None:
    """What to pass a transformers encoder as ``attention_mask`` for a right-padded batch (see the
    module doc): None if the host's ``num_tokens`` (the mask's sum) says there is no padding, the
    SDPA key mask where it applies, else ``attention_mask`` itself."""
    if attention_mask is None:
        return None
    # Not while torch.compile traces: a guard on the count would recompile for new counts (and
    # transformers keeps the mask there too).
    if not torch.compiler.is_compiling() and num_tokens is not None and num_tokens == attention_mask.numel():
        return None
    key_mask = key_padding_mask(config, attention_mask)
    return attention_mask if key_mask is None else key_mask


def with_encoder_mask(config: Any, inputs: Mapping[str, Any], num_tokens: int | None = None) -> dict[str, Any]:
    """A model's keyword arguments with ``attention_mask`` replaced by :func:`encoder_attention_mask`'s
    (left out when that is None: no padding, no mask)."""
    out = dict(inputs)
    mask = encoder_attention_mask(config, out.pop("attention_mask", None), num_tokens)
    if mask is not None:
        out["attention_mask"] = mask
    return out
