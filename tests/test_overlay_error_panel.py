"""The overlay PNG keeps its class legend and, for methods with an error map, gains a panel of the error in mm with
a colour bar (scripts.inferers.overlay, SaveOverlayd)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from scripts.data.image_io import Grid
from scripts.inferers.io_transforms import SaveOverlayd
from scripts.inferers.overlay import CLASS_LABELS, overlay_figure
from tests.helpers.synthetic_pair import image_from_array, phantom_hu


@pytest.fixture
def arrays():
    """A phantom pair, a three-class map and an error map rising along x (0 to 12 mm) on its grid."""
    hu = phantom_hu((24, 24, 24)).astype(np.float32)
    image = np.stack([hu, np.roll(hu, 1, axis=2)])
    inside = hu > -500
    error = np.broadcast_to(np.linspace(0.0, 12.0, hu.shape[2], dtype=np.float32), hu.shape).copy()
    labels = np.where(inside, np.digitize(error, (3.0, 6.0)), -1)
    grid = Grid.of(image_from_array(hu))
    return image, labels, error, grid


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda artist: hasattr(artist, "get_text"))]


def test_error_panel_has_a_colour_bar_in_mm_and_the_legend_stays(arrays):
    image, labels, error, grid = arrays
    plain = overlay_figure(image, labels, grid, title="case")
    with_error = overlay_figure(image, labels, grid, title="case", error_mm=error)
    assert len(plain.axes) == 6 and len(with_error.axes) == 9  # 2 x 4 panels + the colour bar
    for fig in (plain, with_error):
        assert [t.get_text() for t in fig.legends[0].get_texts()] == list(CLASS_LABELS)
    bar_axes = with_error.axes[-1]
    assert bar_axes.get_ylabel() == "expected misalignment (mm)"
    low, high = bar_axes.get_ylim()
    assert low == 0.0 and high == pytest.approx(12.0, abs=0.2)  # the 99th percentile of the error in the mask
    assert sum("expected error" in t for t in _texts(with_error)) == 2 and not any(
        "expected error" in t for t in _texts(plain)
    )
    shown = [im for ax in with_error.axes[:8] for im in ax.get_images() if im.get_cmap().name == "inferno"]
    assert len(shown) == 2 and all(np.ma.getmaskarray(im.get_array()).any() for im in shown)  # masked outside


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_save_overlayd_draws_the_error_panel_only_when_the_method_gives_an_error_map(arrays, tmp_path):
    image, labels, error, grid = arrays
    probabilities = np.stack([(labels == k).astype(np.float32) for k in range(3)])
    data = {
        "image": torch.from_numpy(image),
        "mask": torch.from_numpy(labels[None] >= 0),
        "grid": grid.as_arrays(),
        "landmarks": "",
    }
    network = dict(data, moving="network.nii.gz", pred=torch.from_numpy(probabilities))
    reregistration = dict(
        data,
        moving="rereg.nii.gz",
        pred={"probabilities": torch.from_numpy(probabilities), "error_mm": torch.from_numpy(error)[None]},
    )
    for d in (network, reregistration):
        SaveOverlayd(tmp_path)(d)
    network_width, _ = _png_size(tmp_path / "network_overlay.png")
    error_width, _ = _png_size(tmp_path / "rereg_overlay.png")
    assert error_width > network_width * 1.25  # a fourth column and the colour bar


def test_error_panel_range_keeps_the_class_limits_visible(arrays):
    image, labels, error, grid = arrays
    small = overlay_figure(image, labels, grid, error_mm=error * 0.1)  # errors up to 1.2 mm
    assert small.axes[-1].get_ylim() == (0.0, 12.0)  # at least twice the 6 mm limit
