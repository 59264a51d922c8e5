"""Pictures of label maps over their image: the one place that draws overlays (the demo's overview, refine's
per-case overviews, `workspace show`'s review montage).

A picture is a grid of panels, each one slice in display orientation (LPS, superior up: `display_slices`) with
square pixels in millimetres, the label map filled in colour, another label map outlined, a frame in a colour (a
review state), and a caption. Panels are composed in numpy and placed pixel for pixel (no resampling by the
plotting library), so that what a panel shows can be checked in the PNG; matplotlib (Agg) draws only the text.
Every PNG carries this tool's mark (its `Software` text chunk), like every file it writes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmedsam2.atomic import atomic_path, stem
from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.provenance import MARK

# Label colours (RGB) in the order of the label values; white is the outline, never a fill.
COLOURS = ((255, 127, 14), (23, 190, 207), (44, 160, 44), (148, 103, 189), (214, 39, 40), (188, 189, 34),
           (31, 119, 180), (227, 119, 194), (140, 86, 75), (127, 127, 127))
OUTLINE = (255, 255, 255)
FILL_ALPHA = 0.45
CELL = 192  # the longer side of a panel's image, in pixels
CAPTION = 30  # the caption band above each panel
GAP = 8
TITLE = 44
LEGEND = 26
FRAME = 3
BACKGROUND = (24, 24, 24)


@dataclass
class Panel:
    """One slice to draw: 8-bit grey (h, w), a label map to fill and one to outline (either may be None), a caption
    and a frame colour (None: no frame)."""

    slice: int
    grey: np.ndarray
    fill: np.ndarray | None = None
    outline: np.ndarray | None = None
    caption: str = ""
    frame: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Box:
    """Where a panel's image lies in the PNG: rows top..top+height, columns left..left+width."""

    slice: int
    top: int
    left: int
    height: int
    width: int


def display_slices(image, axis: str) -> tuple[np.ndarray, tuple[float, float]]:
    """The image's voxels (a SimpleITK image) as (n, h, w) slices along `axis` in display orientation (LPS rows
    and columns, superior up on coronal and sagittal slices; slice k is the image's k-th along the axis, as review
    states and confidence tables count), and the (row, column) spacing in mm."""
    import SimpleITK as sitk

    from sslmedsam2.volume.slices import SliceGrid

    grid = SliceGrid.of(image, axis, canonical=True)
    slices = grid.to_slices(sitk.GetArrayViewFromImage(image))
    if grid.flips[0]:  # slice k stays the image's k-th along the axis (review states and tables count so)
        slices = slices[::-1]
    if axis != "axial":
        slices = slices[:, ::-1, :]
    spacing = grid.spacing  # x, y, z; the numpy axis a is SimpleITK's 2 - a
    rows, cols = grid.plane_axes
    return slices, (spacing[2 - rows], spacing[2 - cols])


def grey_slices(image, axis: str, ct: bool = False) -> tuple[np.ndarray, tuple[float, float]]:
    """`display_slices` of the image mapped to 8 bits as SAM2's frames are (MRI percentiles, or a soft-tissue CT
    window)."""
    slices, spacing = display_slices(image, axis)
    volume = np.ascontiguousarray(slices)
    return to_uint8(volume, IntensitySpec(modality="ct" if ct else "mri")), spacing


def label_slices(label_map, axis: str) -> np.ndarray:
    """A label map as (n, h, w) display slices (same orientation as `display_slices` of its image)."""
    return np.ascontiguousarray(display_slices(label_map, axis)[0])


def colour_of(value: int, values: Sequence[int]) -> tuple[int, int, int]:
    """The fill colour of label `value` among the picture's label `values`."""
    ordered = sorted(values)
    return COLOURS[ordered.index(value) % len(COLOURS)] if value in ordered else COLOURS[-1]


def _resample(plane: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Nearest-neighbour to square pixels, the longer side CELL pixels."""
    h, w = plane.shape
    height_mm, width_mm = h * spacing[0], w * spacing[1]
    scale = CELL / max(height_mm, width_mm)
    out_h, out_w = max(1, round(height_mm * scale)), max(1, round(width_mm * scale))
    rows = np.minimum((np.arange(out_h) + 0.5) * h / out_h, h - 1).astype(int)
    cols = np.minimum((np.arange(out_w) + 0.5) * w / out_w, w - 1).astype(int)
    return plane[np.ix_(rows, cols)]


def _edges(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def render_panel(panel: Panel, spacing: tuple[float, float], values: Sequence[int]) -> np.ndarray:
    """The panel's image as RGB uint8 (square pixels): grey, the fill blended in colour, the outline in white."""
    grey = _resample(panel.grey, spacing).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if panel.fill is not None:
        fill = _resample(panel.fill, spacing)
        for value in np.unique(fill[fill > 0]):
            mask = fill == value
            rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * np.array(colour_of(int(value), values), np.float32)
    if panel.outline is not None:
        outline = _resample(panel.outline, spacing)
        for value in np.unique(outline[outline > 0]):
            rgb[_edges(outline == value)] = OUTLINE
    return np.rint(rgb).astype(np.uint8)


def _png_mark(path: Path) -> str | None:
    """The `Software` text chunk of a PNG, or None (not a PNG, no such chunk, unreadable)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    at = 8
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        if kind == b"tEXt" and body.startswith(b"Software\x00"):
            return body[len(b"Software\x00"):].decode("latin-1")
        if kind == b"zTXt" and body.startswith(b"Software\x00"):
            try:
                return zlib.decompress(body[len(b"Software\x00") + 1:]).decode("latin-1")
            except zlib.error:
                return None
        if kind == b"IEND":
            break
        at += 12 + length
    return None


def is_our_picture(path: Path) -> bool:
    """Whether `path` is a PNG this tool wrote (its mark in the `Software` chunk)."""
    mark = _png_mark(path)
    return mark is not None and mark.split(" ", 1)[0] == MARK


def draw_panels(panels: list[Panel], spacing: tuple[float, float], target: Path, title: str,
                legend: dict[int, str] | None = None, columns: int = 4, note: str = "") -> list[Box]:
    """Write the panels as one PNG (atomic, marked); returns where each panel's image lies in it. `legend`: label
    value -> name, drawn as colour swatches; `note`: a line under the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import IdentityTransform

    legend = legend or {}
    values = sorted(legend) or sorted({int(v) for p in panels for v in np.unique(p.fill) if v} if panels else set())
    images = [render_panel(p, spacing, values) for p in panels]
    columns = max(1, min(columns, len(images))) if images else 1
    rows = -(-len(images) // columns) if images else 0
    cell_h = max((im.shape[0] for im in images), default=0) + CAPTION + 2 * FRAME
    cell_w = max((im.shape[1] for im in images), default=CELL) + 2 * FRAME
    width = max(columns * (cell_w + GAP) + GAP, 480)
    bottom = LEGEND * (1 + bool(note))
    height = TITLE + rows * (cell_h + GAP) + bottom
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    boxes = []
    for k, (panel, image) in enumerate(zip(panels, images)):
        top = TITLE + (k // columns) * (cell_h + GAP) + CAPTION + FRAME
        left = GAP + (k % columns) * (cell_w + GAP) + FRAME
        h, w = image.shape[:2]
        if panel.frame is not None:
            canvas[top - FRAME:top + h + FRAME, left - FRAME:left + w + FRAME] = panel.frame
        canvas[top:top + h, left:left + w] = image
        boxes.append(Box(panel.slice, top, left, h, w))
    for k, value in enumerate(values):  # legend swatches
        y, x = height - bottom + 8, GAP + k * 150
        canvas[y:y + 12, x:x + 12] = colour_of(value, values)
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.figimage(canvas, 0, 0, origin="upper")
    text = {"color": "white", "fontsize": 8, "va": "top", "transform": IdentityTransform()}
    fig.text(GAP, height - 8, title, **{**text, "fontsize": 9})
    for panel, box in zip(panels, boxes):
        fig.text(box.left, height - (box.top - CAPTION - FRAME) - 2, panel.caption, **{**text, "fontsize": 7.5})
    for k, value in enumerate(values):
        fig.text(GAP + k * 150 + 16, height - (height - bottom + 6), legend.get(value, f"label {value}"), **text)
    if note:
        fig.text(GAP, LEGEND - 6, note, **{**text, "fontsize": 7.5, "color": "#dddddd"})
    from sslmedsam2 import __version__

    with atomic_path(Path(target)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": f"{MARK} {__version__}"})
    plt.close(fig)
    return boxes


def spread(candidates: Sequence[int], count: int) -> list[int]:
    """`count` of the candidates evenly spread over them (all when fewer)."""
    candidates = list(candidates)
    if len(candidates) <= count:
        return candidates
    return [candidates[i] for i in np.linspace(0, len(candidates) - 1, count).round().astype(int)]


def draw_overview(image, fill, outline, target: Path, title: str, axis: str, legend: dict[int, str] | None = None,
                  columns: int = 5, avoid=None, ct: bool = False) -> list[Box]:
    """Slices spread across the structure: `fill` (a label map, e.g. a result) in colour over the image, `outline`
    (e.g. the manual label; None: none) in white. Slices where `avoid` (e.g. the drawn seeds) has a label are left
    out. The slices are those where `outline` (else `fill`) has a label."""
    grey, spacing = grey_slices(image, axis, ct)
    filled = label_slices(fill, axis)
    outlined = None if outline is None else label_slices(outline, axis)
    reference = filled if outlined is None else outlined
    skip = np.zeros(len(grey), bool) if avoid is None else label_slices(avoid, axis).any(axis=(1, 2))
    picks = spread([z for z in np.flatnonzero(reference.any(axis=(1, 2))) if not skip[z]], columns)
    panels = [Panel(int(z), grey[z], filled[z], None if outlined is None else outlined[z], f"slice {z}")
              for z in picks]
    return draw_panels(panels, spacing, target, title, legend, columns=columns)


def overview_path(outdir: Path, case: Path) -> Path:
    """Where a cohort command (`pseudolabel`, `predict --input`) draws a case: OUTDIR/overview/<name>.png."""
    return Path(outdir) / "overview" / f"{stem(Path(case))}.png"


def draw_result(image, label_map, target: Path, title: str, axis: str, legend: dict[int, str] | None = None,
                ct: bool = False) -> None:
    """A result at a glance, as the demo draws one: `label_map` in colour over slices spread across it (its
    folder is made if needed)."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    draw_overview(image, label_map, None, target, title, axis, legend, ct=ct)
