"""SAM2's video predictor, fed in-memory frames and tracking without keeping every frame's memory.

Built by sam2's own builder (``++model._target_`` points here), so weights load through sam2's checkpoint code.
Everything SAM2 computes is SAM2's; this class only changes where frames come from and what is kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor


def _memory_in_weight_dtype(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """SAM2 stores memories in bf16; outside autocast (CPU) they must meet float32 weights as float32."""
    if not torch.is_autocast_enabled(kwargs["curr"][0].device.type if isinstance(kwargs.get("curr"), list) else "cpu"):
        for key in ("memory", "memory_pos"):
            if key in kwargs and kwargs[key].dtype != torch.float32:
                kwargs[key] = kwargs[key].float()
    return args, kwargs


class SlicePredictor(SAM2VideoPredictor):
    compiled_step = None  # the tracking step's model part compiled (compiled.py, `--compile`); None: eager

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.memory_attention.register_forward_pre_hook(_memory_in_weight_dtype, with_kwargs=True)

    @torch.inference_mode()
    def init_state_from_frames(self, frames: Sequence, height: int, width: int,
                               offload_state_to_cpu: bool = False) -> dict:
        """The state `init_state` builds from a JPEG folder, built from any indexable frames instead."""
        device = self.device
        state: dict = {
            "images": frames,
            "num_frames": len(frames),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": height,
            "video_width": width,
            "device": device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
        return state

    def _get_image_feature(self, inference_state: dict, frame_idx: int, batch_size: int):
        """With a feature store in the state, each distinct frame is encoded once, whichever video it appears in.

        `state["frame_keys"][i]` names frame i's content; `state["feature_store"]` maps names to encoder outputs.
        A list of names is a batch of videos tracked together, one frame each (already in the store).
        Without a store this is sam2's own method (which keeps only the most recent frame).
        """
        store = inference_state.get("feature_store")
        if store is None:
            return super()._get_image_feature(inference_state, frame_idx, batch_size)
        key = inference_state["frame_keys"][frame_idx]
        device = inference_state["device"]
        if isinstance(key, list):
            if len(key) != batch_size:
                raise ValueError(f"{len(key)} frames named for a batch of {batch_size}")
            found = [store.get(k) for k in key]
            if any(f is None for f in found):
                raise LookupError("batched tracking reads only frames already in the feature store")
            fpn = [torch.cat([f["backbone_fpn"][level] for f in found]).to(device, non_blocking=True)
                   for level in range(len(found[0]["backbone_fpn"]))]
            pos = found[0]["vision_pos_enc"]
        else:
            backbone_out = store.get(key)
            if backbone_out is None:
                image = inference_state["images"][frame_idx].to(device).float().unsqueeze(0)
                backbone_out = self.forward_image(image)
                store.put(key, backbone_out)
            fpn = [f.to(device, non_blocking=True).expand(batch_size, -1, -1, -1) for f in backbone_out["backbone_fpn"]]
            pos = backbone_out["vision_pos_enc"]
        expanded = {"backbone_fpn": fpn,
                    "vision_pos_enc": [p.to(device, non_blocking=True).expand(batch_size, -1, -1, -1) for p in pos]}
        # the first element (the input image) is not read by tracking; a placeholder avoids keeping frames
        return (None, *self._prepare_backbone_features(expanded))

    @property
    def memory_window(self) -> int:
        """How many past frames' outputs tracking can still read (mask memories and object pointers)."""
        return max(self.num_maskmem, self.max_obj_ptrs_in_encoder) * self.memory_temporal_stride_for_eval + 1

    @torch.inference_mode()
    def forget_tracking(self, state: dict) -> None:
        """Drop tracked (non-seed) outputs so the next pass starts as from a fresh state.

        Seed (conditioning) outputs stay: they depend only on the seed mask and its frame, not on direction.
        """
        for obj_idx, outputs in state["output_dict_per_obj"].items():
            outputs["non_cond_frame_outputs"].clear()
            tracked = state["frames_tracked_per_obj"][obj_idx]
            for frame_idx in [f for f in tracked if f not in outputs["cond_frame_outputs"]]:
                del tracked[frame_idx]

    @torch.inference_mode()
    def track(self, state: dict, order: Sequence[int], reverse: bool,
              objects: Callable[[int], list[int]]) -> Iterator[tuple[int, list[int], torch.Tensor, torch.Tensor]]:
        """Like `propagate_in_video`, for the objects `objects(frame)` names on each frame.

        Yields (frame, object indices, low-resolution logits (k, 1, S/4, S/4), object score logits (k, 1)).
        Outputs older than the memory window are released, so memory stays flat however many slices there are.
        """
        self.propagate_in_video_preflight(state)
        window = self.memory_window
        step = -1 if reverse else 1
        for frame_idx in order:
            masks, scores = [], []
            active = objects(frame_idx)
            for obj_idx in active:
                outputs = state["output_dict_per_obj"][obj_idx]
                out = outputs["cond_frame_outputs"].get(frame_idx)
                if out is None:
                    out, _ = self._run_single_frame_inference(
                        inference_state=state, output_dict=outputs, frame_idx=frame_idx, batch_size=1,
                        is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                        run_mem_encoder=True)
                    outputs["non_cond_frame_outputs"][frame_idx] = out
                state["frames_tracked_per_obj"][obj_idx][frame_idx] = {"reverse": reverse}
                outputs["non_cond_frame_outputs"].pop(frame_idx - step * window, None)
                masks.append(out["pred_masks"])
                scores.append(out["object_score_logits"])
            if active:
                yield frame_idx, active, torch.cat(masks), torch.cat(scores)
