"""The memory banks a tracking step assembles together equal the ones SAM2's own code assembles track by track."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_SIZE

from sslmedsam2.models import get_model
from sslmedsam2.propagation.builder import build_predictor
from sslmedsam2.propagation import attention, memory_bank


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)


def sams_bank(predictor, outputs: dict, frame: int, reverse: bool, num_frames: int):
    """(memory, position encoding, pointer tokens) from sam2's `_prepare_memory_conditioned_features`, its memory
    attention recorded instead of run: the reference."""
    recorded = {}
    side = TINY_SIZE // 16
    feats = [torch.zeros(side * side, 1, predictor.hidden_dim)]

    def record(curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        recorded.update(memory=memory, pos=memory_pos, pointers=num_obj_ptr_tokens)
        return torch.zeros_like(curr[0])

    predictor.memory_attention.forward = record
    try:
        predictor._prepare_memory_conditioned_features(
            frame_idx=frame, is_init_cond_frame=False, current_vision_feats=feats, current_vision_pos_embeds=feats,
            feat_sizes=[(side, side)], output_dict=outputs, num_frames=num_frames, track_in_reverse=reverse)
    finally:
        del predictor.memory_attention.forward
    return recorded["memory"].float(), recorded["pos"].float(), int(recorded["pointers"])


def _output(predictor, generator, encoding):
    side = TINY_SIZE // 16
    return {"maskmem_features": torch.randn(1, predictor.mem_dim, side, side, generator=generator).to(torch.bfloat16),
            "maskmem_pos_enc": [encoding], "obj_ptr": torch.randn(1, predictor.hidden_dim, generator=generator)}


def _random_tracks(predictor, seed: int, count: int = 6, encodings: int = 2):
    """Tracks with seeds and tracked outputs at random frames (some seeds shared between tracks, as a label's two
    passes and a support's videos share them), each on a frame it has not got an output for. Memories carry one of
    `encodings` position encodings (sam2 gives every memory of a state the same one)."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    side = TINY_SIZE // 16
    encodings = [torch.randn(1, predictor.mem_dim, side, side, generator=generator) for _ in range(encodings)]
    shared = {f: _output(predictor, generator, encodings[0]) for f in rng.sample(range(40), 3)}
    tracks = []
    for _ in range(count):
        num_frames = rng.choice([3, 9, 40])
        reverse = rng.random() < 0.5
        frames = rng.sample(range(num_frames), min(num_frames, rng.randint(2, 25)))
        cond = {f: out for f, out in shared.items() if f < num_frames and rng.random() < 0.6}
        cond.setdefault(frames[0], _output(predictor, generator, encodings[0]))
        tracked = {f: _output(predictor, generator, rng.choice(encodings)) for f in frames[1:] if f not in cond}
        free = [f for f in range(num_frames) if f not in cond and f not in tracked] or [frames[-1]]
        tracked.pop(free[0], None)
        tracks.append(({"cond_frame_outputs": cond, "non_cond_frame_outputs": tracked}, free[0], reverse, num_frames))
    return tracks


SETTINGS = [{}, {"max_cond_frames_in_attn": 2}, {"memory_temporal_stride_for_eval": 2},
            {"only_obj_ptrs_in_the_past_for_eval": False, "use_signed_tpos_enc_to_obj_ptrs": False}]


@pytest.mark.parametrize("settings", SETTINGS, ids=["sam2.1", "two-cond-frames", "stride-2", "unsigned-pointers"])
@pytest.mark.parametrize("capacity", [None, (16, 24)], ids=["longest", "capacity"])
def test_assembled_banks_equal_sams(predictor, monkeypatch, settings, capacity):
    for name, value in settings.items():
        monkeypatch.setattr(predictor, name, value)
    tokens, split = (TINY_SIZE // 16) ** 2, memory_bank.pointer_split(predictor)
    for seed in range(8):
        tracks = _random_tracks(predictor, seed, encodings=1 + seed % 2)
        selections = [memory_bank.select(predictor, *track) for track in tracks]
        with torch.inference_mode():
            memory, pos, pointers, mask = memory_bank.assemble(predictor, selections, torch.device("cpu"), capacity)
        spatial = memory.shape[0] - pointers
        assert memory.isfinite().all() and pos.isfinite().all(), "padding must hold numbers (a masked NaN spreads)"
        layouts = {s.layout for s in selections}
        assert (mask is None) == (capacity is None and len(layouts) == 1)
        for b, track in enumerate(tracks):
            with torch.inference_mode():
                expected, expected_pos, expected_pointers = sams_bank(predictor, *track)
            used = list(range(len(selections[b].memories) * tokens))
            used += range(spatial, spatial + expected_pointers)
            assert expected_pointers == len(selections[b].pointers) * split
            assert torch.equal(memory[used, b], expected[:, 0]), f"seed {seed}, track {b}: memories differ"
            assert torch.allclose(pos[used, b], expected_pos[:, 0], atol=1e-6), f"seed {seed}, track {b}"
            if mask is not None:
                assert mask[b, 0, 0].nonzero().flatten().tolist() == used


def test_padded_banks_attend_as_each_bank_alone(predictor):
    """The layout and mask of padded banks, at the memory attention's output (where random weights do depend on
    every key: the final masks of a random-weight SAM2 barely do)."""
    tracks = _random_tracks(predictor, seed=11, count=4)
    selections = [memory_bank.select(predictor, *track) for track in tracks]
    assert len({s.layout for s in selections}) > 1, "no two banks differ: padding untested"
    tokens = (TINY_SIZE // 16) ** 2
    generator = torch.Generator().manual_seed(1)
    curr = torch.randn(tokens, len(tracks), predictor.hidden_dim, generator=generator)
    curr_pos = torch.randn(tokens, 1, predictor.hidden_dim, generator=generator)
    memory_attention = predictor.memory_attention
    with torch.inference_mode():
        alone = []
        for b, track in enumerate(tracks):
            memory, pos, pointers = sams_bank(predictor, *track)
            alone.append(memory_attention(curr=curr[:, b:b + 1], curr_pos=curr_pos, memory=memory, memory_pos=pos,
                                   num_obj_ptr_tokens=pointers))
        memory, pos, pointers, mask = memory_bank.assemble(predictor, selections, torch.device("cpu"))
        args = dict(curr=curr, curr_pos=curr_pos.expand(-1, len(tracks), -1), memory=memory, memory_pos=pos,
                    num_obj_ptr_tokens=pointers)
        with attention.key_mask(mask):
            together = memory_attention(**args)
        unmasked = memory_attention(**args)
    for b, one in enumerate(alone):
        assert torch.allclose(together[:, b:b + 1], one, atol=1e-5)
    assert (unmasked - together).abs().max() > 1e-3, "the mask made no difference: this test could not fail"


def test_a_track_without_seeds_or_a_bank_over_capacity_is_refused(predictor):
    with pytest.raises(ValueError, match="conditioning"):
        memory_bank.select(predictor, {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}, 3, False, 9)
    tracks = _random_tracks(predictor, seed=2, count=2)
    selections = [memory_bank.select(predictor, *track) for track in tracks]
    with pytest.raises(ValueError, match="capacity"):
        memory_bank.assemble(predictor, selections, torch.device("cpu"), (1, 1))
