"""The overlay PNG (like the paper's Fig. 4): fixed image, deformed moving image and the green/yellow/red
misalignment map on an axial and a coronal slice through the region of interest, with landmarks if given; for methods
that estimate it, a fourth panel shows the expected misalignment in mm with a colour bar marking the class limits.

Arrays are on the 1 mm LPS grid in (z, y, x) order; axial slices are shown in the radiological convention
(patient's left on the right, anterior up), coronal slices with the head up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from scripts.data.image_io import Grid
from scripts.data.landmark_csv import LandmarkTable
from scripts.data.landmarks import true_classes as landmark_classes
from scripts.utils.atomic_write import atomic_output
from scripts.utils.constants import CLASS_NAMES, CLASS_THRESHOLDS_MM

CLASS_COLOURS = ("#1fb41f", "#ffd21f", "#e8221f")  # correct green, poor yellow, wrong red
UNASSESSED_COLOUR = "#9a9a9a"  # landmarks outside the assessed region: gray, never a class colour
CLASS_LABELS = ("correct [0,3) mm", "poor [3,6) mm", "wrong [6,inf) mm")
HU_WINDOW = (-1100.0, 300.0)  # lung-and-soft-tissue window
SLAB_MM = 3.0  # landmarks within this distance of a slice are drawn on it
MAP_ALPHA = 0.45
ERROR_CMAP = "inferno"  # perceptually uniform, dark (small error) to bright (large error)
ERROR_ALPHA = 0.75
ERROR_PERCENTILE = 99.0  # the colour bar ends at this percentile of the error in the mask (at least 2x the last limit)


def choose_slices(labels: np.ndarray, landmark_index: Optional[np.ndarray], slab: float = SLAB_MM) -> Tuple[int, int]:
    """Axial (z) and coronal (y) slice: the ones with the most landmarks within ``slab`` voxels, else the mask's
    centre of mass. ``labels``: ``(z, y, x)`` with -1 outside the mask; ``landmark_index``: ``[N, 3]`` continuous
    (x, y, z) indices.

    Args:
        labels: ``(z, y, x)`` class map, -1 outside the mask.
        landmark_index: optional ``[N, 3]`` continuous voxel indices, x-y-z order.
        slab: half thickness of the slab counted around a slice, voxels.

    Returns:
        Tuple ``(z, y)`` of slice indices.
    """
    if landmark_index is not None and len(landmark_index):
        z, y = landmark_index[:, 2], landmark_index[:, 1]
        counts_z = [np.sum(np.abs(z - k) <= slab) for k in range(labels.shape[0])]
        counts_y = [np.sum(np.abs(y - k) <= slab) for k in range(labels.shape[1])]
        return int(np.argmax(counts_z)), int(np.argmax(counts_y))
    inside = np.argwhere(labels >= 0)
    if len(inside) == 0:
        return labels.shape[0] // 2, labels.shape[1] // 2
    centre = inside.mean(axis=0)
    return int(round(centre[0])), int(round(centre[1]))


def _crop_box(mask: np.ndarray, margin: int = 10) -> Tuple[slice, slice]:
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return slice(None), slice(None)
    return (
        slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
        slice(max(cols.min() - margin, 0), cols.max() + margin + 1),
    )


def _extent(box: slice, size: int) -> int:
    return len(range(*box.indices(size)))


def overlay_figure(
    image: np.ndarray,
    labels: np.ndarray,
    grid: Grid,
    landmarks: Optional[LandmarkTable] = None,
    title: str = "",
    trained: bool = True,
    note: str = "",
    error_mm: Optional[np.ndarray] = None,
    assessed: Optional[np.ndarray] = None,
) -> Figure:
    """The overlay figure: fixed, deformed moving, the class map (and the error in mm) per slice, legend, title.

    Args:
        image: ``[2, z, y, x]`` HU (fixed, deformed moving) on the 1 mm ``grid``.
        labels: ``(z, y, x)`` 0/1/2, -1 outside the mask.
        landmarks: drawn within 3 mm of each slice, coloured by their true class when the table has a ``tre``
            column (white otherwise).
        trained: False puts "UNTRAINED WEIGHTS - NOT A PREDICTION" in the title.
        note: a warning shown under the title (e.g. that the map is constant).
        error_mm: ``(z, y, x)`` expected misalignment in mm (methods that estimate it): adds a panel per slice
            with a colour bar in mm, the class limits marked on it.
        assessed: bool ``[N]``, which landmarks were assessed; the others are drawn gray (``UNASSESSED_COLOUR``).
    """
    index = None if landmarks is None else grid.continuous_index(landmarks.points())
    true_classes = None if landmarks is None else landmark_classes(landmarks)
    slab = SLAB_MM / min(grid.spacing)
    z, y = choose_slices(labels, index, slab)
    cmap = ListedColormap(CLASS_COLOURS)
    views = [
        ("axial", lambda v: v[z], (1, 0), False),  # rows y (anterior up), columns x (patient left on the right)
        ("coronal", lambda v: v[:, y], (2, 0), True),  # rows z (head up), columns x
    ]
    boxes = [_crop_box(take(labels) >= 0) for _, take, _, _ in views]
    heights = [
        _extent(r, labels.shape[1 if k == 0 else 0]) / _extent(c, labels.shape[2]) for k, (r, c) in enumerate(boxes)
    ]
    panel_width = 4.4  # inches
    columns = 3 if error_mm is None else 4
    width = columns * panel_width + (0.8 if error_mm is not None else 0.0)  # room for the colour bar
    fig = Figure(figsize=(width, panel_width * sum(heights) + 2.2), dpi=90, layout="constrained")
    axes = fig.subplots(2, columns, gridspec_kw={"height_ratios": heights})
    error_image, error_range = None, _error_range(error_mm, labels >= 0) if error_mm is not None else (0.0, 1.0)
    for row, (name, take, (row_axis, col_axis), flip) in enumerate(views):
        fixed, moving, lab = take(image[0]), take(image[1]), take(labels)
        rows, cols = boxes[row]
        origin = "lower" if flip else "upper"
        panels = [("fixed", fixed), ("deformed moving", moving), ("predicted misalignment", fixed)]
        panels += [("expected error", fixed)] if error_mm is not None else []
        for col, (label, background) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(background[rows, cols], cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], origin=origin)
            if col == 2:
                shown = np.ma.masked_less(lab[rows, cols], 0)
                ax.imshow(
                    shown, cmap=cmap, vmin=-0.5, vmax=2.5, alpha=MAP_ALPHA, origin=origin, interpolation="nearest"
                )
            if col == 3:
                shown = np.ma.masked_where(lab[rows, cols] < 0, take(error_mm)[rows, cols])
                error_image = ax.imshow(
                    shown,
                    cmap=ERROR_CMAP,
                    vmin=error_range[0],
                    vmax=error_range[1],
                    alpha=ERROR_ALPHA,
                    origin=origin,
                    interpolation="nearest",
                )
            if index is not None and col > 0:
                depth = index[:, 2] if name == "axial" else index[:, 1]
                level = z if name == "axial" else y
                near = np.abs(depth - level) <= slab
                colours = ["white"] * len(index) if true_classes is None else [CLASS_COLOURS[c] for c in true_classes]
                if assessed is not None:
                    colours = [c if ok else UNASSESSED_COLOUR for c, ok in zip(colours, assessed)]
                r = index[near, row_axis] - (rows.start or 0)
                c = index[near, col_axis] - (cols.start or 0)
                ax.scatter(c, r, s=46, c=[colours[i] for i in np.flatnonzero(near)], edgecolors="black", linewidths=0.8)
            ax.set_title(f"{label}, {name} slice {z if name == 'axial' else y}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    if error_image is not None:
        bar = fig.colorbar(error_image, ax=axes[:, 3], shrink=0.8, extend="max")
        bar.set_label("expected misalignment (mm)", fontsize=10)
        for limit in CLASS_THRESHOLDS_MM:
            bar.ax.axhline(limit, color="white", linewidth=1.2)
    handles = [Patch(color=c, label=t) for c, t in zip(CLASS_COLOURS, CLASS_LABELS)]
    if assessed is not None and not np.all(assessed):
        handles.append(Patch(color=UNASSESSED_COLOUR, label=f"landmark not assessed ({int(np.sum(~assessed))})"))
    legend_title = "map (and landmark true class)" if true_classes is not None else "map"
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), title=legend_title, fontsize=10)
    text, colour = overlay_title(title, trained, note)
    bold = not trained or bool(note)
    fig.suptitle(text, fontsize=14 if bold else 13, color=colour, fontweight="bold" if bold else "normal")
    return fig


def save_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, grid: Grid, *args, **kwargs) -> Path:
    """Write the overlay PNG atomically (arguments of ``overlay_figure``).

    Args:
        path: PNG file to write.
        image: ``[2, z, y, x]`` HU (fixed, deformed moving) on ``grid``.
        labels: ``(z, y, x)`` 0/1/2, -1 outside the mask.
        grid: the 1 mm working grid.
        *args: further positional arguments of ``overlay_figure``.
        **kwargs: further keyword arguments of ``overlay_figure``.

    Returns:
        ``path`` as a ``Path``.
    """
    fig = overlay_figure(image, labels, grid, *args, **kwargs)
    with atomic_output(path) as temporary:
        fig.savefig(temporary, format="png")
    return Path(path)


def _error_range(error_mm: np.ndarray, mask: np.ndarray) -> Tuple[float, float]:
    """Colour range of the error panel: 0 to the ERROR_PERCENTILE of the error in the mask, at least twice the last
    class limit, so the 3 and 6 mm limits always lie inside the colour bar."""
    values = error_mm[mask & np.isfinite(error_mm)] if mask.any() else np.zeros(1)
    top = float(np.percentile(values, ERROR_PERCENTILE)) if values.size else 0.0
    return 0.0, max(top, 2.0 * float(CLASS_THRESHOLDS_MM[-1]))


def overlay_title(title: str, trained: bool, note: str = "") -> Tuple[str, str]:
    """The PNG's title and its colour: plainly "UNTRAINED WEIGHTS - NOT A PREDICTION" (red) without trained weights;
    a ``note`` (warning) is added on a second line and turns the title red too.

    Args:
        title: title text (e.g. the moving image's stem).
        trained: whether trained weights were used.
        note: optional warning for a second line.

    Returns:
        Tuple ``(text, colour)``.
    """
    if not trained:
        return (
            f"{title}: UNTRAINED WEIGHTS - NOT A PREDICTION\n(models/model.pt not found; the map only shows that the "
            "pipeline runs)",
            "#c00000",
        )
    text = f"{title}: misalignment map ({', '.join(CLASS_NAMES)})"
    return (f"{text}\nWARNING: {note}", "#c00000") if note else (text, "black")
