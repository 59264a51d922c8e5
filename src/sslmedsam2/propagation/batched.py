"""Tracking steps of many tracks at once: every label, forward and backward pass, one batched SAM2 call per step.

A track is one object followed in one direction. Tracks read different memories (their own seeds, their own recent
frames, pointers from their own past), so their memory banks differ in length; SAM2's memory attention has no
padding mask. The step's banks are therefore assembled together (memory_bank.py, SAM2's selection rules), padded
to the longest, and attended with a key mask; the mask decoder and the memory encoder then run on the whole batch.
Per track, the numbers are those of sam2's `_run_single_frame_inference` (tested to 1e-4 in float32); on a GPU a
step costs about one track's latency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sslmedsam2.propagation import attention, memory_bank
from sslmedsam2.propagation.predictor import SlicePredictor


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

    def keep(self, frame: int, output: dict, window: int) -> None:
        """Store a tracked frame's output and drop the one that fell out of the memory window."""
        stored = self.outputs["non_cond_frame_outputs"]
        stored[frame] = output
        stored.pop(frame + (window if self.reverse else -window), None)


def _attend(predictor: SlicePredictor, feats: torch.Tensor, pos: torch.Tensor,
            selections: list[memory_bank.Selection]) -> torch.Tensor:
    """Memory attention of every track (feats: (tokens, tracks, channels)) over its own bank. On a GPU all tracks
    go in one call, banks padded to the longest (a step costs its latency, not its arithmetic); on a CPU tracks
    whose banks have the same layout go together, so no track attends over padding."""
    if predictor.device.type == "cuda" or attention.AS_ON_GPU:
        groups = [list(range(len(selections)))]
    else:
        layouts: dict[tuple[int, int], list[int]] = {}
        for b, selection in enumerate(selections):
            layouts.setdefault(selection.layout, []).append(b)
        groups = list(layouts.values())
    attended = None
    for group in groups:
        memory, memory_pos, pointers, mask = memory_bank.assemble(predictor, [selections[b] for b in group],
                                                                  feats.device)
        index = None if len(groups) == 1 else torch.tensor(group, device=feats.device)
        curr, curr_pos = (feats, pos) if index is None else (feats[:, index], pos[:, index])
        with attention.key_mask(mask):
            out = predictor.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                             num_obj_ptr_tokens=pointers)
        if index is None:
            return out
        if attended is None:
            attended = out.new_empty(out.shape[0], len(selections), out.shape[2])
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


@dataclass
class StepOutputs:
    """A step's outputs: per (track, frame), what sam2's `_run_single_frame_inference` stores; and the step's
    low-resolution logits (tracks, 1, S/4, S/4) and object score logits (tracks, 1) as batches, for recording
    with one operation."""

    outputs: list[dict]
    masks: torch.Tensor
    scores: torch.Tensor


def track_step(predictor: SlicePredictor, state: dict, steps: list[tuple[Track, int]],
               tracks: Sequence[Track] = ()) -> StepOutputs:
    """One tracking step of every (track, frame) in `steps`, as one batch. Frames' features come from the state's
    store. With a compiled step on the predictor (`compiled.enable`), the model part runs compiled, in a shape that
    holds every track of the run (`tracks`; default: those of this step), so that one shape serves every step."""
    keys = [track.key(state, frame) for track, frame in steps]
    view = {**state, "frame_keys": {-1: keys}}
    _, _, feats, pos, sizes = predictor._get_image_feature(view, -1, len(steps))
    selections = [memory_bank.select(predictor, track.outputs, frame, track.reverse,
                                     track.num_frames or state["num_frames"]) for track, frame in steps]
    result = None
    if predictor.compiled_step is not None:  # None back: it could not compile, and has switched itself off
        result = predictor.compiled_step(feats, pos, sizes, selections, tracks or [t for t, _ in steps])
    if result is None:
        result = model_step(predictor, feats, pos, sizes,
                            lambda curr, curr_pos: _attend(predictor, curr, curr_pos, selections))
    low_res, obj_ptr, scores, maskmem, maskmem_pos = result
    if predictor.fill_hole_area > 0:
        from sam2.utils.misc import fill_holes_in_mask_scores

        low_res = fill_holes_in_mask_scores(low_res, predictor.fill_hole_area)
    storage = state["storage_device"]
    # converted and moved once for the batch; each output holds a view of its row
    maskmem = maskmem.to(torch.bfloat16).to(storage, non_blocking=True)
    stored_masks = low_res.to(storage)
    encoding = predictor._get_maskmem_pos_enc(state, {"maskmem_pos_enc": [maskmem_pos[:1]]})
    outputs = [{"maskmem_features": maskmem[b:b + 1], "maskmem_pos_enc": encoding, "pred_masks": stored_masks[b:b + 1],
                "obj_ptr": obj_ptr[b:b + 1], "object_score_logits": scores[b:b + 1]} for b in range(len(steps))]
    return StepOutputs(outputs, low_res, scores)


def record_outputs(logits: torch.Tensor, presence: torch.Tensor, rows: list[int], masks: torch.Tensor,
                   scores: torch.Tensor) -> None:
    """A batch of outputs (low-resolution logits (k, 1, S/4, S/4), object score logits (k, 1)) written into result
    tensors on the compute device, `logits` (N, S/4, S/4) and presence probabilities `presence` (N,), at `rows`:
    one operation each, no wait for the GPU. The outputs may sit elsewhere (a seed's on the state's storage)."""
    index = memory_bank.to_device(rows, logits.device)
    logits.index_copy_(0, index, masks[:, 0].to(logits.device, torch.float32))
    presence.index_copy_(0, index, torch.sigmoid(scores[:, 0].to(logits.device, torch.float32)))


# (object, frame, reverse) of each row, low-resolution logits (rows, 1, S/4, S/4), object score logits (rows, 1)
OnOutputs = Callable[[list[tuple[int, int, bool]], torch.Tensor, torch.Tensor], None]


def run_tracks(predictor: SlicePredictor, state: dict, passes, on_outputs: OnOutputs | None = None,
               on_step: Callable[[int], None] | None = None) -> dict[tuple[int, bool], Track]:
    """Both passes of every object in lockstep. `passes` is `tracking_passes(...)`: (frames, reverse, objects on a
    frame) per direction. `on_outputs` gets every step's outputs as one batch, and the seeds' own outputs on their
    seed frames as another; `on_step(count)` after each step with the number of frames done. Returns the tracks by
    (object, reverse), holding the outputs later frames could still read."""
    objects = len(state["obj_ids"])
    tracks = {(i, reverse): Track(i, reverse, {
        "cond_frame_outputs": state["output_dict_per_obj"][i]["cond_frame_outputs"],
        "non_cond_frame_outputs": {}}) for i in range(objects) for _, reverse, _ in passes}
    window = predictor.memory_window
    every = list(tracks.values())
    longest = max(len(order) for order, _, _ in passes)
    for t in range(longest):
        batch, seeds = [], []
        for order, reverse, active in passes:
            if t >= len(order):
                continue
            frame = order[t]
            for i in active(frame):
                track = tracks[(i, reverse)]
                seed = track.outputs["cond_frame_outputs"].get(frame)
                if seed is None:
                    batch.append((track, frame))
                else:
                    seeds.append(((i, frame, reverse), seed))
        if seeds and on_outputs is not None:
            on_outputs([row for row, _ in seeds], torch.cat([out["pred_masks"] for _, out in seeds]),
                       torch.cat([out["object_score_logits"] for _, out in seeds]))
        if batch:
            step = track_step(predictor, state, batch, every)
            for (track, frame), out in zip(batch, step.outputs):
                track.keep(frame, out, window)
            if on_outputs is not None:
                on_outputs([(track.obj, frame, track.reverse) for track, frame in batch], step.masks, step.scores)
        if on_step is not None:
            on_step(sum(t < len(order) for order, _, _ in passes))
    return tracks
