"""Benchmark: how fast an exact re-propagation after an edit could ever be on this machine, from its arithmetic.

An edit's result must equal a cold run with the same seeds. SAM2 attends to every conditioning frame, so one
corrected slice changes the memory of every tracked slice and all of them are tracked again: the edit is the
tracking arithmetic. This script counts that arithmetic (the matrix products and attention of one in-process edit,
the same volume, seeds and edit as bench/interactive.py), measures the machine's peak float32 matrix-product rate
and one cold `sslmedsam2 propagate` process, and prints the bound that follows:

  edit_min = edit GFLOP / peak rate                  (every product at peak, nothing else costing anything)
  speedup_max = (cold - edit + edit_min) / edit_min  (a faster tracker also shortens the cold run by as much)
  rate_for_5x: the share of peak the whole edit would have to run at for edit_speedup >= 5

  python bench/edit_bound.py        # CHAOS T2 case 2 if ../shared/data exists, else synthetic; image size 256
Last line: edit_gflop=<n> peak_gflops=<n> edit=<s> edit_min=<s> cold=<s> speedup_now=<x> speedup_max=<x>
rate_for_5x=<share of peak>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interactive import cold, prepare, synthetic, volume_arguments  # noqa: E402  (the same volume, seeds and edit)


def peak_gflops(size: int = 2048, runs: int = 10) -> float:
    """float32 matrix products at every core torch uses: the machine's arithmetic ceiling for this work."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(runs):
        a @ b
    return 2 * size ** 3 * runs / (time.perf_counter() - start) / 1e9


def counted_gflop(run) -> float:
    """Floating-point operations of `run()` as torch's profiler counts them (matrix products, convolutions, a few
    elementwise ones), plus fused attention, which it leaves uncounted: 2 * queries * keys * (key + value width)
    per batch and head."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        run()
    def counted_below(event) -> int:
        return sum(child.flops or 0 for child in event.cpu_children) + sum(counted_below(c) for c in event.cpu_children)

    flops = sum(event.flops for event in prof.key_averages() if event.flops)
    for event in prof.events():
        # a fused kernel is one uncounted operator; torch's fallback (values narrower than keys) runs counted ones
        if event.name == "aten::scaled_dot_product_attention" and not counted_below(event):
            q, k, v = event.input_shapes[:3]
            flops += 2 * int(np.prod(q[:-1])) * k[-2] * (q[-1] + v[-1])
    return flops / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    volume_arguments(parser)
    parser.add_argument("--repeat", type=int, default=3, help="edits and cold runs measured; the fastest counts")
    args = parser.parse_args()
    args.device = "cpu"

    import torch

    from sslmedsam2.frames.intensity import IntensitySpec, to_uint8
    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor
    from sslmedsam2.pipeline import load_case
    from sslmedsam2.labelmap.seeds import Seeds
    from sslmedsam2.propagation.tracker import VolumeTracker

    with tempfile.TemporaryDirectory(prefix="bench-edit-bound-") as tmp:
        work = Path(tmp)
        if args.synthetic_slices or args.image is None:
            args.image, args.label = synthetic(work, args.synthetic_slices or 31, args.synthetic_size)
        _, edited, edit, _ = prepare(args, work)
        first = load_case(args.image, work / "seeds.nii.gz", log=lambda _: None)
        predictor = build_predictor(get_model(args.model), Path(args.checkpoint), "cpu", args.image_size)
        session = VolumeTracker(predictor, to_uint8(first.volume, IntensitySpec()))
        session.propagate(first.seeds)  # encodes every slice once, as a server session does
        again = Seeds(np.ascontiguousarray(edited))
        edits = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            session.propagate(again)
            edits.append(time.perf_counter() - start)
        t_edit = min(edits)
        gflop = counted_gflop(lambda: session.propagate(again))
        peak = peak_gflops()
        t_cold = min(cold(args, work / "edited.nii.gz", work / "cold.nii.gz") for _ in range(args.repeat))

    edit_min = gflop / peak
    rest = t_cold - t_edit  # start, model build, encoding, files: what an edit does not repeat
    print(f"{Path(args.image).name}, {args.model} at image size {args.image_size}, {torch.get_num_threads()} threads, "
          f"edit adds slice {edit}")
    print(f"edit: {gflop:.1f} GFLOP in {t_edit:.2f} s = {gflop / t_edit:.0f} GFLOP/s; this machine's float32 matrix "
          f"product peak: {peak:.0f} GFLOP/s ({gflop / t_edit / peak:.0%} of it)")
    print(f"cold process {t_cold:.2f} s, of which {rest:.2f} s is not tracking; at peak the edit would take "
          f"{edit_min:.2f} s and the speedup reach {(rest + edit_min) / edit_min:.1f}; a speedup of 5 needs the edit "
          f"within {rest / 4:.2f} s, {gflop / (rest / 4) / peak:.0%} of peak")
    print(f"edit_gflop={gflop:.1f} peak_gflops={peak:.0f} edit={t_edit:.2f} edit_min={edit_min:.2f} cold={t_cold:.2f} "
          f"speedup_now={t_cold / t_edit:.1f} speedup_max={(rest + edit_min) / edit_min:.1f} "
          f"rate_for_5x={gflop / (rest / 4) / peak:.0%}")


if __name__ == "__main__":
    main()
