"""The block-causal attention rule of the prefix-LM families (big_vision's make_attn_mask, used by
openpi's pi0 and LeRobot's pi0 / SmolVLA): one rule, so every family masks the same way; and which
image slots a batch fills (a slot empty in every row is left out of the prefix).

    ar   (B, T) int: 1 where a token starts a new block (earlier blocks cannot see it), else 0
    pad  (B, T) bool: True for real tokens, False for padding

Query i sees key j when cumsum(ar)[j] <= cumsum(ar)[i] and both are real tokens. Every token also
sees itself, so a padding row is never empty: scaled-dot-product attention never returns NaN there
(the reference's eager softmax gives such rows a uniform average instead; padding outputs are never
read, and padding keys are masked for every real query, so real tokens are unaffected either way).
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_causal_mask(ar: Tensor, pad: Tensor) -> Tensor:
    """ar (B, T) int, pad (B, T) bool -> mask (B, T, T) bool, True where query i may see key j."""
    c = torch.cumsum(ar, dim=1)
    mask = (c[:, None, :] <= c[:, :, None]) & pad[:, None, :] & pad[:, :, None]
    return mask | torch.eye(ar.shape[1], dtype=torch.bool, device=ar.device)


def present_slots(image_masks: Tensor) -> tuple[int, ...]:
    """The image slots masked in at least one row (B, N) -> their indices (one host sync): a slot
    absent from the whole batch contributes no prefix tokens (an exact shortcut)."""
    return tuple(i for i, there in enumerate(image_masks.any(dim=0).tolist()) if there)
