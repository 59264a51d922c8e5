"""Runs ITK's morphological contour interpolation in a process of its own: `python -m ... SEEDS.npy OUT.npy`.

Only numpy and itk are imported here. A process that has used SimpleITK and then this `itk` filter segfaults
at exit (both packages carry their own ITK libraries), so the filter never shares a process with SimpleITK.
"""

from __future__ import annotations

import sys

import numpy as np


def interpolate(seeds_map: np.ndarray) -> np.ndarray:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(seeds_map))
    # ITK index axis 2 is numpy axis 0, the slice axis of a slice-first array
    result = itk.morphological_contour_interpolator(image, axis=2)
    return np.asarray(itk.array_from_image(result)).astype(seeds_map.dtype, copy=False)


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    np.save(target, interpolate(np.load(source)))
