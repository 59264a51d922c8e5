"""The memory banks of a tracking step's tracks, assembled together in a few tensor operations.

SAM2 assembles one track's bank (`_prepare_memory_conditioned_features`) from its conditioning frames, its recent
frames and its object pointers with about fifty tensor operations; with twenty tracks a step (few-shot videos) that
is a thousand operator launches, more than the batched model itself issues, and on a GPU the step waits for the
host. Here the choice of memories is SAM2's rules run on the outputs' frame numbers (`select`), and the tensors of
every track come from one gather over the step's distinct outputs (`assemble`): a memory shared by many tracks (a
seed, a support's prompt) is read once. The banks equal SAM2's (tested against its own code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames


@dataclass
class Selection:
    """What one track reads on one frame, in SAM2's order: spatial memories as (output, t_pos) and object pointers
    as (signed temporal offset, output); offsets are divided by `scale` before their sine encoding."""

    memories: list[tuple[dict, int]]
    pointers: list[tuple[int, dict]]
    scale: int

    @property
    def layout(self) -> tuple[int, int]:
        return len(self.memories), len(self.pointers)


def select(predictor, outputs: dict, frame: int, reverse: bool, num_frames: int) -> Selection:
    """SAM2's choice of memories for a non-conditioning frame (evaluation mode), without touching a tensor."""
    cond = outputs["cond_frame_outputs"]
    tracked = outputs["non_cond_frame_outputs"]
    if not cond:
        raise ValueError("a track needs at least one conditioning (seed) output")
    selected, unselected = select_closest_cond_frames(frame, cond, predictor.max_cond_frames_in_attn)

    def output_at(t: int) -> dict | None:
        out = tracked.get(t)
        return unselected.get(t) if out is None else out

    memories = [(out, 0) for out in selected.values()]
    stride, span = predictor.memory_temporal_stride_for_eval, predictor.num_maskmem
    for t_pos in range(1, span):
        t_rel = span - t_pos  # frames before this one (after it, in reverse)
        if t_rel == 1:
            previous = frame + 1 if reverse else frame - 1
        elif reverse:
            previous = -(-(frame + 2) // stride) * stride + (t_rel - 2) * stride
        else:
            previous = ((frame - 2) // stride) * stride - (t_rel - 2) * stride
        out = output_at(previous)
        if out is not None:
            memories.append((out, t_pos))

    most = min(num_frames, predictor.max_obj_ptrs_in_encoder)
    pointers: list[tuple[int, dict]] = []
    if predictor.use_obj_ptrs_in_encoder:
        sign = -1 if reverse else 1
        for t, out in selected.items():
            if predictor.only_obj_ptrs_in_the_past_for_eval and (t < frame if reverse else t > frame):
                continue
            pointers.append(((frame - t) * sign if predictor.use_signed_tpos_enc_to_obj_ptrs else abs(frame - t), out))
        for t_diff in range(1, most):
            t = frame + t_diff if reverse else frame - t_diff
            if t < 0 or t >= num_frames:
                break
            out = output_at(t)
            if out is not None:
                pointers.append((t_diff, out))
    return Selection(memories, pointers, most - 1)


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers as a tensor on `device`, copied without waiting: a pageable source would let the driver wait
    for the GPU's queued work first, so on CUDA they go from (cached) pinned memory."""
    tensor = torch.tensor(values)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def pointer_split(predictor) -> int:
    """Memory tokens per object pointer (a pointer wider than the memory is split into several)."""
    return max(1, predictor.hidden_dim // predictor.mem_dim)


def _rows(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Distinct tensors (by storage and view) and each input's row among them: a tensor that several outputs
    share (sam2 keeps one memory position encoding per state) is gathered once."""
    seen: dict[tuple, int] = {}
    distinct, rows = [], []
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
               tensor.device)
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(tensor)
        rows.append(seen[key])
    return distinct, rows


def _padded_rows(per_track: list[list[int]], length: int, pad: int = 0) -> list[int]:
    return [row for rows in per_track for row in (rows + [pad] * (length - len(rows)))]


def assemble(predictor, selections: Sequence[Selection], device: torch.device,
             capacity: tuple[int, int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """The banks of `selections`, laid out as [spatial memories | pointer tokens], each part padded to the longest
    (or to `capacity`: (memory frames, pointers), a compiled step's fixed shape). Returns (memory (tokens, tracks,
    mem_dim) float32, its position encoding, the number of pointer tokens, the key mask (tracks, 1, 1, tokens);
    None when no track needed padding, decided from the lengths: no step waits for the GPU)."""
    count = len(selections)
    frames = capacity[0] if capacity else max(len(s.memories) for s in selections)
    pointers = capacity[1] if capacity else max(len(s.pointers) for s in selections)
    if any(len(s.memories) > frames or len(s.pointers) > pointers for s in selections):
        raise ValueError(f"a memory bank does not fit the capacity {capacity}")
    mem_dim, split = predictor.mem_dim, pointer_split(predictor)

    outputs = {id(out): out for s in selections for out, _ in s.memories}
    index = {key: i for i, key in enumerate(outputs)}
    features = torch.cat([out["maskmem_features"] for out in outputs.values()]).to(device, non_blocking=True)
    encodings, encoding_rows = _rows([out["maskmem_pos_enc"][-1] for out in outputs.values()])
    encodings = torch.cat(encodings).to(device, non_blocking=True)
    height, width = features.shape[-2:]
    tokens = height * width
    memory_rows = [[index[id(out)] for out, _ in s.memories] for s in selections]
    packed = [_padded_rows(memory_rows, frames),
              _padded_rows([[encoding_rows[r] for r in rows] for rows in memory_rows], frames),
              _padded_rows([[predictor.num_maskmem - t_pos - 1 for _, t_pos in s.memories] for s in selections], frames),
              [len(s.memories) for s in selections]]
    if pointers:
        pointer_outputs = {id(out): out for s in selections for _, out in s.pointers}
        pointer_index = {key: i for i, key in enumerate(pointer_outputs)}
        packed += [_padded_rows([[pointer_index[id(out)] for _, out in s.pointers] for s in selections], pointers),
                   _padded_rows([[offset for offset, _ in s.pointers] for s in selections], pointers),
                   _padded_rows([[s.scale] * len(s.pointers) for s in selections], pointers, pad=1),  # no 0 / 0
                   [len(s.pointers) for s in selections]]
    flat = to_device([value for part in packed for value in part], device)  # one copy a step
    sizes = [len(part) for part in packed]
    parts = flat.split(sizes)

    # each part written once into the bank, converted on the way (no intermediate copies of a bank that reaches
    # 200 MB a step for twenty few-shot tracks at image size 512)
    spatial = frames * tokens
    memory = torch.empty(spatial + pointers * split, count, mem_dim, device=device)
    memory_pos = torch.empty_like(memory)
    # spatial memories: SAM2 concatenates each memory's (tokens, 1, mem_dim), so the frame is the outer index
    gathered = features.flatten(2)[parts[0].view(count, frames)]  # (tracks, frames, mem_dim, tokens)
    memory[:spatial].view(frames, tokens, count, mem_dim).copy_(gathered.permute(1, 3, 0, 2))
    if len(encodings) == 1:  # sam2 keeps one per state: broadcast it, (1, tokens, 1, mem_dim)
        encoding = encodings.flatten(2).permute(0, 2, 1).unsqueeze(2)
    else:
        encoding = encodings.flatten(2)[parts[1].view(count, frames)].permute(1, 3, 0, 2)
    temporal = predictor.maskmem_tpos_enc[parts[2].view(count, frames)].view(count, frames, mem_dim)
    memory_pos[:spatial].view(frames, tokens, count, mem_dim).copy_(encoding + temporal.permute(1, 0, 2).unsqueeze(1))
    if pointers:
        stacked = torch.cat([out["obj_ptr"] for out in pointer_outputs.values()])  # (pointers, hidden_dim)
        ptr = stacked[parts[4].view(count, pointers)].view(count, pointers, split, mem_dim)
        memory[spatial:].view(pointers, split, count, mem_dim).copy_(ptr.permute(1, 2, 0, 3))
        if predictor.add_tpos_enc_to_obj_ptrs:
            dim = predictor.hidden_dim if predictor.proj_tpos_enc_in_obj_ptrs else mem_dim
            ptr_pos = predictor.obj_ptr_tpos_proj(get_1d_sine_pe(parts[5] / parts[6], dim=dim))
            ptr_pos = ptr_pos.view(count, pointers, 1, mem_dim).permute(1, 2, 0, 3)
            memory_pos[spatial:].view(pointers, split, count, mem_dim).copy_(ptr_pos.expand(-1, split, -1, -1))
        else:
            memory_pos[spatial:] = 0
    if capacity is None and len({s.layout for s in selections}) == 1:
        return memory, memory_pos, pointers * split, None
    mask = (torch.arange(frames, device=device) < parts[3][:, None]).repeat_interleave(tokens, 1)
    if pointers:
        in_use = (torch.arange(pointers, device=device) < parts[7][:, None]).repeat_interleave(split, 1)
        mask = torch.cat([mask, in_use], 1)
    return memory, memory_pos, pointers * split, mask.view(count, 1, 1, -1)
