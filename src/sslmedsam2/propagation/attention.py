"""How SAM2's memory attention is computed here: over padded memory banks with a key mask, and, on a CPU, with
the value projection applied after attending.

Key mask: sam2's attention has no padding mask. While `key_mask(mask)` is active, attention over keys of the
mask's length uses it, so tracks whose banks differ in length attend in one call (batched.py).

Value projection: each query's attention weights sum to one, so attending over the raw 64-channel memory and then
projecting to 256 channels gives sam2's numbers (to rounding) with a quarter of the value arithmetic: values are
projected for the 256 queries instead of the thousands of memory tokens, and the weights multiply 64 channels
instead of 256. Measured on the 2-core CPU, 2 x 256 queries over 2,368 memory tokens: 8.4 -> 5.3 ms. A GPU step
is bound by its latency, not its arithmetic, and fused GPU attention kernels want values as wide as keys: sam2's
own order stays there. `MemoryCrossAttention` is chosen in the model's configuration (`models.loader`), so the
module keeps sam2's parameters and checkpoints load as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from sam2.modeling.position_encoding import apply_rotary_enc
from sam2.modeling.sam import transformer

# Attend as on a GPU on every device: every track's bank padded into one call (batched.py), sam2's order of the
# cross-attention. Tests and bench/step_ops.py check the GPU's operators on a CPU with it.
AS_ON_GPU = False

_KEY_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("sslmedsam2_key_mask", default=None)


class _MaskHolder:
    mask: torch.Tensor | None = None


# a compiled step (compiled.py) cannot trace a ContextVar; it hands its mask over here
COMPILED_MASK = _MaskHolder()


@contextlib.contextmanager
def key_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Attention over keys of the mask's length (boolean, True: attend; broadcast over queries) uses `mask`."""
    token = _KEY_MASK.set(mask)
    try:
        yield
    finally:
        _KEY_MASK.reset(token)


def _mask_for(keys: int) -> torch.Tensor | None:
    mask = COMPILED_MASK.mask if torch.compiler.is_compiling() else _KEY_MASK.get()
    return mask if mask is not None and mask.shape[-1] == keys else None


class _MaskedAttention:
    """Stands in for torch.nn.functional inside sam2's transformer module: attention takes the key mask; everything
    else is torch's own."""

    def __getattr__(self, name: str):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is None:
            attn_mask = _mask_for(k.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)


if not isinstance(transformer.F, _MaskedAttention):
    transformer.F = _MaskedAttention()


class MemoryCrossAttention(transformer.RoPEAttention):
    """sam2's cross-attention from a frame to its memory bank; on a CPU, values projected after attending."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        # dropout would break the weights' sum to one; several heads would each need their slice of the projection
        if q.device.type != "cpu" or AS_ON_GPU or self.num_heads != 1 or (self.training and self.dropout_p > 0):
            return super().forward(q, k, v, num_k_exclude_rope)
        q = self._separate_heads(self.q_proj(q), 1)
        k = self._separate_heads(self.k_proj(k), 1)
        v = self._separate_heads(v, 1)
        if self.freqs_cis.shape[0] != q.shape[-2] or self.freqs_cis.device != q.device:
            side = q.shape[-2] ** 0.5
            self.freqs_cis = self.compute_cis(end_x=side, end_y=side).to(q.device)
        rotated = k.size(-2) - num_k_exclude_rope  # object pointers come last, without rotary encoding
        q, k[:, :, :rotated] = apply_rotary_enc(q, k[:, :, :rotated], freqs_cis=self.freqs_cis,
                                                repeat_freqs_k=self.rope_k_repeat)
        # written out: torch's fused CPU kernel wants values as wide as keys, and its fallback costs 2 ms more a call
        weights = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
        mask = _mask_for(k.shape[-2])
        if mask is not None:
            weights.masked_fill_(~mask, float("-inf"))
        out = torch.matmul(weights.softmax(-1), v)
        return self.out_proj(self.v_proj(self._recombine_heads(out)))
