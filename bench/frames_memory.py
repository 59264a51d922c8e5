"""Peak RAM of the frames SAM2 reads: sam2's JPEG loader vs this engine's lazy frames.

A 512 x 512 x 600 volume at image size 1024 (the issue's worst case). sam2's loader holds every frame as a
3 x 1024 x 1024 float32 tensor (12 MiB each, 7.5 GB for 600); VolumeFrames holds the 8-bit volume and builds
one frame at a time. Each variant runs in its own process.   python bench/frames_memory.py [--slices 600]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _volume(slices: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    base = ((np.sin(yy / 17) + np.cos(xx / 23) + 2) * 60).astype(np.uint8)
    return np.stack([np.roll(base, z, axis=0) for z in range(slices)])


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(variant: str, slices: int, size: int, image_size: int, work: Path) -> dict:
    volume = _volume(slices, size)
    start = time.perf_counter()
    if variant == "jpeg":
        from PIL import Image
        from sam2.utils.misc import load_video_frames

        for i, s in enumerate(volume):
            Image.fromarray(s).save(work / f"{i:05d}.jpg")
        del volume
        frames, _, _ = load_video_frames(str(work), image_size=image_size, offload_video_to_cpu=True, compute_device="cpu")
        checksum = float(sum(frames[i].mean() for i in range(len(frames))))
    else:
        from sslmedsam2.frames.video import VolumeFrames

        frames = VolumeFrames(volume, image_size)
        checksum = float(sum(frames[i].mean() for i in range(len(frames))))
    return {"variant": variant, "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_mb(), "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.slices, args.size, args.image_size, Path(args.work))))
        return
    print(f"{args.slices} slices of {args.size}x{args.size}, frames at {args.image_size}x{args.image_size}")
    for variant in ("lazy", "jpeg"):
        with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
            cmd = [sys.executable, __file__, "--variant", variant, "--work", tmp, "--slices", str(args.slices),
                   "--size", str(args.size), "--image-size", str(args.image_size)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"{variant:>5}: peak RAM {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f} s to build every frame once")


if __name__ == "__main__":
    main()
