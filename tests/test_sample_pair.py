"""The shipped sample pair (sample_data/), the pieces of scripts/registration/sample_pair.py that make it, and the
synthetic pair of the speed benchmarks (scripts/data/synthetic_pair.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monai.bundle import ConfigWorkflow
from sklearn.metrics import cohen_kappa_score

from scripts.data.image_io import Grid, read_image
from scripts.data.landmark_csv import read_landmarks
from scripts.data.landmarks import read_landmarks_in_image, true_classes
from scripts.data.synthetic_pair import invert_at_points
from scripts.evaluation.simulated_benchmark import landmark_mask
from scripts.registration.sample_pair import resample_to_spacing, residual_at_points

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"


def test_shipped_sample_pair_is_small_consistent_and_mixed():
    """Fixed and registered moving image on one grid, every landmark inside, all three true classes present."""
    fixed = read_image(SAMPLE_DIR / "fixed.nii.gz", "fixed image")
    moving = read_image(SAMPLE_DIR / "moving.nii.gz", "moving image")
    assert Grid.of(moving).same_as(Grid.of(fixed))
    sizes = [(SAMPLE_DIR / n).stat().st_size for n in ("fixed.nii.gz", "moving.nii.gz")]
    assert max(sizes) < 3.5e6 and sum(sizes) < 6.5e6  # a few MB: the two images of a 2 mm crop of both lungs
    table = read_landmarks_in_image(SAMPLE_DIR / "landmarks.csv", Grid.of(fixed), "fixed.nii.gz")
    assert table.columns == ["id", "x", "y", "z", "tre"] and len(table) >= 50
    counts = np.bincount(true_classes(table), minlength=3)
    assert (counts >= 5).all()  # correct, poor and wrong landmarks
    difference = np.abs(sitk.GetArrayViewFromImage(fixed) - sitk.GetArrayViewFromImage(moving))
    assert 5.0 < np.median(difference[sitk.GetArrayViewFromImage(fixed) > -500]) < 300.0  # similar, not identical


def test_residual_at_points_interpolates_a_linear_field():
    """The landmarks' true error comes from the residual field at physical points: exact for a linear field."""
    reference = sitk.Image([12, 10, 8], sitk.sitkInt16)
    reference.SetSpacing((1.0, 1.0, 2.0))
    reference.SetOrigin((-5.0, 3.0, 10.0))
    z, y, x = np.meshgrid(np.arange(8.0), np.arange(10.0), np.arange(12.0), indexing="ij")
    field = np.stack([0.5 * x, y - 0.25 * z, np.full_like(x, 2.0)])  # components (x, y, z) in mm
    points = np.array([[-5.0 + 3.5, 3.0 + 4.25, 10.0 + 2 * 2.5], [-5.0 + 10.0, 3.0 + 0.5, 10.0 + 2 * 6.0]])
    expected = np.array([[1.75, 4.25 - 0.625, 2.0], [5.0, 0.5 - 1.5, 2.0]])
    np.testing.assert_allclose(residual_at_points(field, reference, points), expected, atol=1e-5)


def test_resample_to_spacing_keeps_the_extent_and_the_value_type():
    image = sitk.GetImageFromArray(np.full((30, 20, 40), -500, np.int16))
    image.SetOrigin((1.0, 2.0, 3.0))
    coarse = resample_to_spacing(image, 2.0)
    assert coarse.GetSize() == (20, 10, 15) and coarse.GetPixelID() == sitk.sitkInt16
    assert coarse.GetOrigin() == image.GetOrigin() and coarse.GetSpacing() == (2.0, 2.0, 2.0)
    assert (sitk.GetArrayViewFromImage(coarse)[2:-2, 2:-2, 2:-2] == -500).all()
    mask = resample_to_spacing(sitk.Cast(image < 0, sitk.sitkUInt8), 2.0, sitk.sitkNearestNeighbor)
    assert mask.GetPixelID() == sitk.sitkUInt8 and (sitk.GetArrayViewFromImage(mask) == 1).all()


def test_invert_at_points_inverts_a_smooth_displacement():
    reference = sitk.Image([20, 20, 20], sitk.sitkFloat64)
    reference.SetSpacing((2.0, 2.0, 2.0))
    z, y, x = np.meshgrid(*[np.arange(20.0)] * 3, indexing="ij")
    field = np.stack([3.0 * np.sin(z / 6.0), 2.0 * np.cos(x / 5.0), 1.5 * np.sin(y / 7.0)], axis=-1)
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(reference)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    points = np.array([[10.0, 12.0, 14.0], [20.0, 18.0, 9.0]])
    inverse = invert_at_points(transform, points)
    forward = np.array([transform.TransformPoint(tuple(p)) for p in inverse])
    np.testing.assert_allclose(forward, points, atol=0.01)
    assert np.abs(inverse - points).max() > 0.5  # the inverse really moved the points


@pytest.mark.slow
def test_shipped_weights_give_a_real_prediction_on_the_sample_pair(tmp_path):
    """README command 1's claim, on the landmarks' neighbourhoods only (the same values, fewer tiles): the shipped
    network with its class weights says more than one class and agrees with the true classes beyond chance."""
    root = SAMPLE_DIR.parent
    if not (root / "models" / "model.pt").is_file():
        pytest.skip("no shipped weights")
    mask = landmark_mask(SAMPLE_DIR / "fixed.nii.gz", SAMPLE_DIR / "landmarks.csv", tmp_path / "mask.nii.gz")
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(root),
        method="network",
        output_dir=str(tmp_path / "out"),
        mask=str(mask),
        progress=False,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    table = read_landmarks(tmp_path / "out" / "moving_landmarks.csv", required=("pred", "tre"))
    predicted = np.array([int(v) for v in table.values["pred"]])
    assert len(np.unique(predicted)) >= 2
    assert cohen_kappa_score(true_classes(table), predicted) > 0.05  # 0.16 measured (docs/README.md)
