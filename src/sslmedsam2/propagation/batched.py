"""Tracking steps of many tracks at once: every label, forward and backward pass, one batched SAM2 call per step.

A track is one object followed in one direction. Tracks read different memories (their own seeds, their own recent
frames, pointers from their own past), so their memory banks differ in length; SAM2's memory attention has no
padding mask. Each track's bank is therefore assembled by sam2's own selection code (`_prepare_memory_conditioned_
features`, its attention call recorded instead of run), padded to the longest, and attended with a key mask; the
mask decoder and the memory encoder then run on the whole batch. Per track, the numbers are those of sam2's
`_run_single_frame_inference` (tested to 1e-4 in float32); on a GPU a step costs about one track's latency.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sam2.modeling.sam import transformer

from sslmedsam2.propagation.predictor import SlicePredictor

_KEY_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("sslmedsam2_key_mask", default=None)


class _MaskedAttention:
    """Stands in for torch.nn.functional inside sam2's transformer module: while a key mask is set, attention over
    keys of the mask's length uses it (the padded memory bank); everything else is torch's own."""

    def __getattr__(self, name: str):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, attn_mask=None, **kwargs):
        # a compiled step (compiled.py) cannot trace a ContextVar; it hands its mask over in `COMPILED_MASK`
        mask = COMPILED_MASK.mask if torch.compiler.is_compiling() else _KEY_MASK.get()
        if mask is not None and attn_mask is None and k.shape[-2] == mask.shape[-1]:
            attn_mask = mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)


class _MaskHolder:
    mask: torch.Tensor | None = None


COMPILED_MASK = _MaskHolder()

if not isinstance(transformer.F, _MaskedAttention):
    transformer.F = _MaskedAttention()


@contextlib.contextmanager
def _key_mask(mask: torch.Tensor | None) -> Iterator[None]:
    token = _KEY_MASK.set(mask)
    try:
        yield
    finally:
        _KEY_MASK.reset(token)


@dataclass
class Track:
    """One object followed in one direction of one video: its outputs so far (seeds shared with the other
    direction). A few-shot track numbers the frames of its own video, so it names the stored features of each
    frame itself (`frame_key`); by default a frame's features are the state's `frame_keys[frame]`."""

    obj: int
    reverse: bool
    outputs: dict = field(default_factory=dict)  # {"cond_frame_outputs": {...}, "non_cond_frame_outputs": {...}}
    frame_key: Callable[[int], object] | None = None
    num_frames: int | None = None  # its video's length, when videos of several lengths share a state

    def key(self, state: dict, frame: int) -> object:
        return state["frame_keys"][frame] if self.frame_key is None else self.frame_key(frame)


@dataclass
class _Bank:
    memory: torch.Tensor  # (tokens, 1, mem_dim)
    pos: torch.Tensor
    pointers: int  # trailing object-pointer tokens (no rotary encoding)


def _record_bank(predictor: SlicePredictor, track: Track, frame: int, feats, pos, sizes, num_frames: int) -> _Bank:
    """The memory bank sam2 would attend to for this track on this frame, from sam2's own selection code."""
    recorded = {}
    attention = predictor.memory_attention

    def record(curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        recorded.update(memory=memory, pos=memory_pos, pointers=num_obj_ptr_tokens)
        return torch.zeros_like(curr[0] if isinstance(curr, list) else curr)

    attention.forward = record
    try:
        predictor._prepare_memory_conditioned_features(
            frame_idx=frame, is_init_cond_frame=False, current_vision_feats=feats[-1:],
            current_vision_pos_embeds=pos[-1:], feat_sizes=sizes[-1:], output_dict=track.outputs,
            num_frames=num_frames, track_in_reverse=track.reverse)
    finally:
        del attention.forward
    return _Bank(recorded["memory"], recorded["pos"], int(recorded["pointers"]))


def _padded(banks: list[_Bank], capacity: tuple[int, int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Banks laid out as [spatial memories | pointers], each part padded to the longest (or to `capacity`, the
    fixed (spatial, pointer) lengths of a compiled step); the key mask (None when no track needed padding, decided
    from the lengths: no step waits for the GPU)."""
    lengths = [(b.memory.shape[0] - b.pointers, b.pointers) for b in banks]
    if capacity is None and len(set(lengths)) == 1:
        return torch.cat([b.memory for b in banks], 1), torch.cat([b.pos for b in banks], 1), banks[0].pointers, None
    spatial, pointers = capacity or (max(s for s, _ in lengths), max(p for _, p in lengths))
    first = banks[0].memory
    memory = first.new_zeros(spatial + pointers, len(banks), first.shape[-1])
    pos = memory.clone().to(banks[0].pos.dtype)
    mask = torch.zeros(len(banks), 1, 1, spatial + pointers, dtype=torch.bool, device=first.device)
    for b, (bank, (s, p)) in enumerate(zip(banks, lengths)):
        memory[:s, b], pos[:s, b] = bank.memory[:s, 0], bank.pos[:s, 0]
        memory[spatial:spatial + p, b] = bank.memory[s:, 0]
        pos[spatial:spatial + p, b] = bank.pos[s:, 0]
        mask[b, ..., :s] = True
        mask[b, ..., spatial:spatial + p] = True
    return memory, pos, pointers, mask


# Pad on every device, as on a GPU (tests check the GPU's layout on CPU with it).
PAD_ALWAYS = False


def _attend(predictor: SlicePredictor, feats: torch.Tensor, pos: torch.Tensor, banks: list[_Bank]) -> torch.Tensor:
    """Memory attention of every track (feats: (tokens, tracks, channels)) over its own bank. On a GPU all tracks
    go in one call, banks padded to the longest (a step costs its latency, not its arithmetic); on a CPU tracks
    whose banks have the same layout go together, so no track attends over padding."""
    if predictor.device.type == "cuda" or PAD_ALWAYS:
        groups = [list(range(len(banks)))]
    else:
        layouts: dict[tuple[int, int], list[int]] = {}
        for b, bank in enumerate(banks):
            layouts.setdefault((bank.memory.shape[0], bank.pointers), []).append(b)
        groups = list(layouts.values())
    attended = None
    for group in groups:
        memory, memory_pos, pointers, mask = _padded([banks[b] for b in group])
        index = None if len(groups) == 1 else torch.tensor(group, device=feats.device)
        curr, curr_pos = (feats, pos) if index is None else (feats[:, index], pos[:, index])
        with _key_mask(mask):
            out = predictor.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                             num_obj_ptr_tokens=pointers)
        if index is None:
            return out
        if attended is None:
            attended = out.new_empty(out.shape[0], len(banks), out.shape[2])
        attended[:, index] = out
    return attended


def model_step(predictor: SlicePredictor, feats: list[torch.Tensor], pos: list[torch.Tensor], sizes: list,
               attend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model part of a step, batched (what a compiled step compiles): memory attention by `attend`, then SAM's
    heads and the memory encoder. Returns (low-res masks, object pointers, object scores, memory features,
    memory position encoding)."""
    attended = attend(feats[-1], pos[-1])
    (height, width), channels = sizes[-1], predictor.hidden_dim
    batch = attended.shape[1]
    pix_feat = attended.permute(1, 2, 0).view(batch, channels, height, width)
    high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
    _, _, _, low_res, high_res_masks, obj_ptr, scores = predictor._forward_sam_heads(
        backbone_features=pix_feat, point_inputs=None, mask_inputs=None, high_res_features=high_res,
        multimask_output=predictor._use_multimask(False, None))
    maskmem, maskmem_pos = predictor._encode_new_memory(current_vision_feats=feats, feat_sizes=sizes,
                                                        pred_masks_high_res=high_res_masks,
                                                        object_score_logits=scores, is_mask_from_pts=False)
    return low_res, obj_ptr, scores, maskmem, maskmem_pos[-1]


def track_step(predictor: SlicePredictor, state: dict, steps: list[tuple[Track, int]],
               tracks: Sequence[Track] = ()) -> list[dict]:
    """One tracking step of every (track, frame) in `steps`, as one batch; returns each step's compact output
    (what sam2's `_run_single_frame_inference` stores), in order. Frames' features come from the state's store.
    With a compiled step on the predictor (`compiled.enable`), the model part runs compiled, in a shape that
    holds every track of the run (`tracks`; default: those of this step), so that one shape serves every step."""
    keys = [track.key(state, frame) for track, frame in steps]
    view = {**state, "frame_keys": {-1: keys}}
    _, _, feats, pos, sizes = predictor._get_image_feature(view, -1, len(steps))
    banks = []
    for b, (track, frame) in enumerate(steps):
        one = [f[:, b:b + 1] for f in feats]
        banks.append(_record_bank(predictor, track, frame, one, [p[:, b:b + 1] for p in pos], sizes,
                                  track.num_frames or state["num_frames"]))
    result = None
    if predictor.compiled_step is not None:  # None back: it could not compile, and has switched itself off
        result = predictor.compiled_step(feats, pos, sizes, banks, tracks or [t for t, _ in steps])
    if result is None:
        result = model_step(predictor, feats, pos, sizes,
                            lambda curr, curr_pos: _attend(predictor, curr, curr_pos, banks))
    low_res, obj_ptr, scores, maskmem, maskmem_pos = result
    if predictor.fill_hole_area > 0:
        from sam2.utils.misc import fill_holes_in_mask_scores

        low_res = fill_holes_in_mask_scores(low_res, predictor.fill_hole_area)
    storage = state["storage_device"]
    outputs = []
    for b in range(len(steps)):
        out = {"maskmem_features": maskmem[b:b + 1].to(torch.bfloat16).to(storage, non_blocking=True),
               "maskmem_pos_enc": [maskmem_pos[b:b + 1]], "pred_masks": low_res[b:b + 1].to(storage),
               "obj_ptr": obj_ptr[b:b + 1], "object_score_logits": scores[b:b + 1]}
        out["maskmem_pos_enc"] = predictor._get_maskmem_pos_enc(state, out)
        outputs.append(out)
    return outputs


def run_tracks(predictor: SlicePredictor, state: dict, passes, on_output: Callable[[int, int, bool, dict], None],
               on_step: Callable[[int], None] | None = None) -> dict[tuple[int, bool], Track]:
    """Both passes of every object in lockstep. `passes` is `tracking_passes(...)`: (frames, reverse, objects on a
    frame) per direction. `on_output(obj, frame, reverse, output)` gets every frame's output (a seed's own output on
    its seed frames); `on_step(count)` after each step with the number of frames done. Returns the tracks by
    (object, reverse), holding the outputs later frames could still read."""
    objects = len(state["obj_ids"])
    tracks = {(i, reverse): Track(i, reverse, {
        "cond_frame_outputs": state["output_dict_per_obj"][i]["cond_frame_outputs"],
        "non_cond_frame_outputs": {}}) for i in range(objects) for _, reverse, _ in passes}
    window = predictor.memory_window
    every = list(tracks.values())
    longest = max(len(order) for order, _, _ in passes)
    for t in range(longest):
        batch = []
        for order, reverse, active in passes:
            if t >= len(order):
                continue
            frame = order[t]
            for i in active(frame):
                track = tracks[(i, reverse)]
                seed = track.outputs["cond_frame_outputs"].get(frame)
                if seed is not None:
                    on_output(i, frame, reverse, seed)
                else:
                    batch.append((track, frame))
        if batch:
            for (track, frame), out in zip(batch, track_step(predictor, state, batch, every)):
                stored = track.outputs["non_cond_frame_outputs"]
                stored[frame] = out
                stored.pop(frame + (window if track.reverse else -window), None)
                on_output(track.obj, frame, track.reverse, out)
        if on_step is not None:
            on_step(sum(t < len(order) for order, _, _ in passes))
    return tracks
