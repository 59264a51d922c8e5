"""SAM2's memory cross-attention with values projected after attending equals sam2's own order."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SIZE
from sam2.modeling.sam.transformer import RoPEAttention

from sslmedsam2.models import get_model
from sslmedsam2.propagation.builder import build_predictor
from sslmedsam2.propagation import attention

SIDE = 8  # an 8 x 8 feature map: 64 queries, 64 tokens per memory frame


def _cross_attention() -> attention.MemoryCrossAttention:
    """Built as sam2.1's configurations build a memory attention layer's cross-attention, random weights."""
    torch.manual_seed(0)
    module = attention.MemoryCrossAttention(rope_theta=10000.0, feat_sizes=[SIDE, SIDE], rope_k_repeat=True,
                                            embedding_dim=256, num_heads=1, downsample_rate=1, dropout=0.1,
                                            kv_in_dim=64)
    for linear in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
        torch.nn.init.normal_(linear.bias, std=0.5)  # sam2 starts biases at zero; the folded bias must count
    return module.eval()


def _inputs(tracks: int, frames: int, pointers: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    keys = frames * SIDE * SIDE + pointers
    q = torch.randn(tracks, SIDE * SIDE, 256, generator=generator)
    memory = torch.randn(tracks, keys, 64, generator=generator)
    pos = torch.randn(tracks, keys, 64, generator=generator)
    return q, memory + pos, memory


@pytest.mark.parametrize("pointers", [0, 16])
def test_values_projected_after_attending_give_sams_numbers(pointers):
    module = _cross_attention()
    q, k, v = _inputs(tracks=2, frames=3, pointers=pointers)
    rows = []
    project = module.v_proj.forward
    module.v_proj.forward = lambda x: rows.append(x.shape[-2]) or project(x)
    with torch.inference_mode():
        ours = module(q, k, v, num_k_exclude_rope=pointers)
        sams = RoPEAttention.forward(module, q, k, v, num_k_exclude_rope=pointers)
    assert rows == [SIDE * SIDE, k.shape[1]], "the values were not projected after attending"
    assert torch.allclose(ours, sams, atol=1e-5), (ours - sams).abs().max()


def test_a_padded_bank_under_its_key_mask_attends_as_the_bank_alone():
    module = _cross_attention()
    q, k, v = _inputs(tracks=2, frames=3, pointers=8)
    short = 2 * SIDE * SIDE  # the second track's bank: two frames, no pointers; the rest is padding
    mask = torch.ones(2, 1, 1, k.shape[1], dtype=torch.bool)
    mask[1, ..., short:] = False
    with torch.inference_mode(), attention.key_mask(mask):
        padded = module(q, k, v, num_k_exclude_rope=8)
    with torch.inference_mode():
        full = RoPEAttention.forward(module, q[:1], k[:1], v[:1], num_k_exclude_rope=8)
        alone = RoPEAttention.forward(module, q[1:], k[1:, :short], v[1:, :short])
    assert torch.allclose(padded[:1], full, atol=1e-5)
    assert torch.allclose(padded[1:], alone, atol=1e-5)


def test_the_predictor_is_built_with_it(tiny_checkpoint):
    predictor = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)
    layers = predictor.memory_attention.layers
    assert all(type(layer.cross_attn_image) is attention.MemoryCrossAttention for layer in layers)
    assert not any(isinstance(layer.self_attn, attention.MemoryCrossAttention) for layer in layers)


def test_attending_as_on_a_gpu_keeps_sams_order(monkeypatch):
    """bench/step_ops.py and the no-wait tests count the GPU's operators on a CPU with this switch."""
    monkeypatch.setattr(attention, "AS_ON_GPU", True)
    module = _cross_attention()
    q, k, v = _inputs(tracks=1, frames=2, pointers=0)
    rows = []
    project = module.v_proj.forward
    module.v_proj.forward = lambda x: rows.append(x.shape[-2]) or project(x)
    with torch.inference_mode():
        module(q, k, v)
    assert rows == [k.shape[1]]
