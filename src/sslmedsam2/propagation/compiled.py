"""Optional (`--compile`): the model part of a tracking step (memory attention, SAM's heads, the memory encoder)
compiled by torch.compile, for fixed shapes.

On a GPU a step is bound by its latency (about 800 operator launches from Python for some 5 ms of GPU work), which
CUDA graphs remove: there the step compiles with mode "reduce-overhead". Shapes must not change from step to step,
so the tracks of a step are padded to a power of two, and the memory banks to a capacity that holds every memory a
track can read (its seeds, the recent frames, the object pointers), rounded up to a power of two of frames: one
compilation serves a whole run and most later ones. Compiling costs tens of seconds per shape, once per process,
and torch keeps the compiled code in an on-disk cache (in the model cache folder), so later processes start faster.
The numbers equal the eager step's to float rounding (tested on CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from sslmedsam2.propagation import attention, batched, memory_bank
from sslmedsam2.propagation.predictor import SlicePredictor

RECOMPILE_LIMIT = 64  # distinct shapes per process before torch falls back to running the step uncompiled


def _power_of_two(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def bank_capacity(predictor: SlicePredictor, tracks: Sequence[batched.Track]) -> tuple[int, int]:
    """(memory frames, object pointers) that hold any bank these tracks can read: all their seeds (SAM2 attends to
    every conditioning frame), the other memories of its window, and up to max_obj_ptrs_in_encoder pointers."""
    seeds = max(len(track.outputs["cond_frame_outputs"]) for track in tracks)
    return (_power_of_two(seeds + predictor.num_maskmem - 1, least=8),
            _power_of_two(seeds + predictor.max_obj_ptrs_in_encoder - 1, least=4))


class CompiledStep:
    """Called by `batched.track_step` in place of the eager model part; `say` gets one line per compilation."""

    def __init__(self, predictor: SlicePredictor, say: Callable[[str], None] = lambda message: None) -> None:
        import torch._dynamo

        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        self.predictor, self.say = predictor, say
        self.graphs = predictor.device.type == "cuda"
        mode = "reduce-overhead" if self.graphs else None  # reduce-overhead: CUDA graphs
        self._run = torch.compile(self._model_step, fullgraph=True, dynamic=False, mode=mode)
        self._shapes: set[tuple] = set()

    def _model_step(self, feats: list[torch.Tensor], pos: list[torch.Tensor], sizes: list, memory: torch.Tensor,
                    memory_pos: torch.Tensor, pointers: int, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        predictor = self.predictor

        def attend(curr: torch.Tensor, curr_pos: torch.Tensor) -> torch.Tensor:
            attention.COMPILED_MASK.mask = mask
            out = predictor.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                             num_obj_ptr_tokens=pointers)
            attention.COMPILED_MASK.mask = None
            return out

        return batched.model_step(predictor, feats, pos, sizes, attend)

    def __call__(self, feats: list[torch.Tensor], pos: list[torch.Tensor], sizes: list,
                 selections: list[memory_bank.Selection], tracks: Sequence[batched.Track]
                 ) -> tuple[torch.Tensor, ...] | None:
        """`selections`: this step's memories; `tracks`: every track of the run, which the shape must hold. None
        when torch could not compile the step here (a compiler stack that does not work on this machine): the
        predictor then tracks uncompiled from this step on, which the caller does."""
        count = len(selections)
        batch = _power_of_two(max(count, len(tracks)))
        if batch > count:  # pad with copies of the last track (real numbers; their outputs are dropped)
            feats = [torch.cat([f, f[:, -1:].expand(-1, batch - count, -1)], 1) for f in feats]
            pos = [torch.cat([p, p[:, -1:].expand(-1, batch - count, -1)], 1) for p in pos]
            selections = selections + [selections[-1]] * (batch - count)
        # one memory layout, whatever views the features come as: strides are part of a compiled shape
        feats, pos = [f.contiguous() for f in feats], [p.contiguous() for p in pos]
        capacity = bank_capacity(self.predictor, tracks)
        memory, memory_pos, pointers, mask = memory_bank.assemble(self.predictor, selections, feats[-1].device,
                                                                  capacity)
        shape = (batch, *capacity, tuple(map(tuple, sizes)))
        started = time.perf_counter()
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            outputs = self._run(feats, pos, sizes, memory, memory_pos, pointers, mask)
        except torch.OutOfMemoryError:
            raise  # the callers' own fallbacks (smaller batches) apply
        except Exception as exc:  # Triton, the C++ compiler or CUDA graphs unusable here: not worth stopping for
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            self.predictor.compiled_step = None
            self.say(f"--compile: the tracking step could not be compiled ({type(exc).__name__}: {first}); "
                     "tracking goes on uncompiled")
            return None
        # a CUDA graph's outputs are overwritten by its next replay; the tracks keep theirs for later steps
        outputs = tuple(o[:count].clone() if self.graphs else o[:count] for o in outputs)
        if shape not in self._shapes:
            self._shapes.add(shape)
            self.say(f"compiled the tracking step for {batch} track(s) and memory banks of {len(memory)} tokens "
                     f"in {time.perf_counter() - started:.1f} s (once per shape and process)")
        return outputs


def cache_folder() -> None:
    """torch's compiled code goes to the model cache folder unless TORCHINDUCTOR_CACHE_DIR says otherwise."""
    from sslmedsam2.models.cache import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torch-compile"))


def enable(predictor: SlicePredictor, say: Callable[[str], None] = lambda message: None) -> SlicePredictor:
    """Compile `predictor`'s tracking steps from now on (returns it)."""
    cache_folder()
    predictor.compiled_step = CompiledStep(predictor, say)
    return predictor
