"""Artificial DVFs (scripts.transforms.artificial_dvf) and warping/intensity (scripts.transforms.artificial_intensity)
on a phantom."""

import numpy as np
import pytest
import SimpleITK as sitk

from scripts.transforms.artificial_dvf import (
    DVF_TYPES,
    RandArtificialDVFd,
    cap_components,
    coarse_arrays,
    coarse_shape,
    draw_dvf,
    dvf_from_sitk,
    dvf_settings,
    dvf_to_sitk,
    jacobian_determinant,
    upsample_dvf,
)
from scripts.transforms.artificial_intensity import RandNextImaged, deform_image, warp_image
from scripts.transforms.ct_masks import ct_masks
from tests.helpers.chest_phantom import chest_phantom, to_image

M = 10.0


@pytest.fixture(scope="module")
def phantom():
    """1 mm phantom (96^3) with masks, and its arrays on the coarse DVF grid."""
    image = chest_phantom(shape=(96, 96, 96), spacing=1.0)
    image.SetSpacing((1.5, 1.5, 1.5))  # 144 mm field of view, 1.5 mm voxels: lungs of about 300 ml
    body, lung = ct_masks(image, "phantom")
    return image, body, lung, coarse_arrays(image, body, lung)


def _draw(phantom, dvf_type, seed=0, variant=1, m=M):
    image, body, lung, (im, b, lu, spacing) = phantom
    return draw_dvf(np.random.RandomState(seed), dvf_type, variant, im, b, lu, spacing, dvf_settings(m))


def test_settings_follow_the_original_code():
    s7, s15, s20, s10 = dvf_settings(7), dvf_settings(15), dvf_settings(20), dvf_settings(10)
    assert s7.single_grid_mm[0] == (50, 50, 50) and s7.single_grid_mm[-1] == (20, 20, 20)
    assert s15.respiratory_t0_mm == 22 and s20.respiratory_t0_mm == 30 and s7.mixed_sigma_mm == (5, 10)
    assert 15 < s10.respiratory_t0_mm < 22 and s7.single_grid_mm[0][0] < s10.single_grid_mm[0][0] < 60
    assert s10.respiratory_cap_ratio == 1.2 and s10.next_image_max_mm == 15
    with pytest.raises(ValueError):
        dvf_settings(0)


@pytest.mark.parametrize("dvf_type", DVF_TYPES)
def test_components_bounded_no_folding_reproducible(phantom, dvf_type):
    dvf = _draw(phantom, dvf_type)
    cap = M * (1.2 if dvf_type == "respiratory_motion" else 1.0)  # docs/method.md section 6: respiratory capped at 1.2M
    assert dvf.shape[0] == 3 and dvf.dtype == np.float32
    assert np.abs(dvf).max() <= cap + 1e-4
    spacing = phantom[3][3]
    jac = jacobian_determinant(dvf, spacing)
    assert jac.min() > 0, f"{dvf_type}: folding, {(jac <= 0).mean():.2%} of voxels"
    np.testing.assert_array_equal(dvf, _draw(phantom, dvf_type))  # same seed, same field
    if dvf_type == "identity":
        assert not dvf.any()
    else:
        assert np.abs(dvf).max() > 0.5, "field is (nearly) zero"
        assert not np.array_equal(dvf, _draw(phantom, dvf_type, seed=1))


def test_respiratory_motion_largest_at_diaphragm(phantom):
    dvf = _draw(phantom, "respiratory_motion")
    lung = phantom[3][2]
    z_lung = np.flatnonzero(lung.any(axis=(1, 2)))
    body = phantom[3][1]
    per_slice = np.array([np.abs(dvf[2][z][body[z]]).mean() for z in z_lung])
    base, apex = per_slice[:3].mean(), per_slice[-3:].mean()
    assert base > 3 * apex, f"cranio-caudal motion at the lung base {base:.2f} mm vs apex {apex:.2f} mm"
    assert dvf[2][z_lung[0]][body[z_lung[0]]].mean() > 0  # I_def(x) = I(x + u): the diaphragm moves caudally


def test_cap_components():
    dvf = np.array([[[[3.0, -12.0]]]] * 3, dtype=np.float32)
    assert np.abs(cap_components(dvf, 6.0)).max() == pytest.approx(6.0)
    assert np.abs(cap_components(dvf / 10, 2.0, min_mm=2.0)).max() == pytest.approx(2.0)


def test_jacobian_of_a_linear_field():
    shape, spacing = (10, 12, 14), (2.0, 1.0, 1.5)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    dvf = np.stack([0.1 * x, -0.2 * y, 0.05 * z]).astype(np.float32)  # components x, y, z
    np.testing.assert_allclose(jacobian_determinant(dvf, spacing), 1.1 * 0.8 * 1.05, rtol=1e-5)


def test_dense_field_is_what_simpleitk_applies(phantom):
    image = phantom[0]
    dvf = _draw(phantom, "single_frequency")
    dense = upsample_dvf(dvf, 2, image.GetSize()[::-1]).numpy()
    transform = sitk.DisplacementFieldTransform(sitk.Cast(dvf_to_sitk(dvf, image), sitk.sitkVectorFloat64))
    for index in [(0, 0, 0), (5, 17, 33), (95, 95, 95), (40, 61, 2)]:  # (x, y, z) voxel indices
        point = image.TransformIndexToPhysicalPoint(index)
        moved = np.subtract(transform.TransformPoint(point), point)
        np.testing.assert_allclose(moved, dense[:, index[2], index[1], index[0]], atol=1e-4)


def test_warp_convention_is_pull():
    array = np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32)
    image = to_image(array, spacing=1.0)
    shift = np.zeros((3,) + coarse_shape(array.shape), dtype=np.float32)
    shift[0] = 3.0  # u_x = +3 mm: I_def(x) = I(x + 3)
    warped = sitk.GetArrayFromImage(warp_image(image, dvf_to_sitk(shift, image)))
    np.testing.assert_allclose(warped[:, :, :-3], array[:, :, 3:], atol=1e-4)


def test_identity_changes_only_by_noise(phantom):
    image, body = phantom[0], phantom[1]
    zero = dvf_to_sitk(_draw(phantom, "identity"), image)
    inside = sitk.GetArrayViewFromImage(body) > 0
    original = sitk.GetArrayFromImage(image)
    clean, _ = deform_image(np.random.RandomState(0), image, zero, body, sponge=False, noise_sigma_hu=0.0)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(clean)[inside], original[inside], atol=1e-3)
    noisy, _ = deform_image(np.random.RandomState(0), image, zero, body, sponge=False, noise_sigma_hu=5.0)
    diff = sitk.GetArrayViewFromImage(noisy)[inside] - original[inside]
    assert abs(diff.mean()) < 0.2 and diff.std() == pytest.approx(5.0, rel=0.05)
    outside = sitk.GetArrayViewFromImage(noisy)[~inside]
    assert np.all(outside == -2048.0)


def test_sponge_model_inside_body(phantom):
    image, body = phantom[0], phantom[1]
    dvf = dvf_to_sitk(_draw(phantom, "single_frequency", variant=4), image)
    plain, _ = deform_image(np.random.RandomState(0), image, dvf, body, sponge=False, noise_sigma_hu=0.0)
    sponge, warped_body = deform_image(np.random.RandomState(0), image, dvf, body, noise_sigma_hu=0.0)
    inside = sitk.GetArrayViewFromImage(warped_body) > 0
    ratio = sitk.GetArrayViewFromImage(sponge)[inside] / sitk.GetArrayViewFromImage(plain)[inside]
    ratio = ratio[np.abs(sitk.GetArrayViewFromImage(plain)[inside]) > 100]
    assert ratio.min() >= 0.9 / 1.3 - 1e-3 and ratio.max() <= 1.1 / 0.7 + 1e-3
    assert ratio.std() > 1e-3  # the Jacobian varies


def test_dict_transforms_are_seeded(phantom):
    image, body, lung = phantom[:3]
    data = {"image": image, "body_mask": body, "lung_mask": lung}
    outputs = []
    for seed in (3, 3, 4):
        t = RandArtificialDVFd(max_deformation_mm=M)
        t.set_random_state(seed=seed)
        out = t(data)
        assert out["dvf_type"] in DVF_TYPES and out["dvf"].GetSpacing() == (3.0, 3.0, 3.0)
        outputs.append((out["dvf_type"], out["variant"], dvf_from_sitk(out["dvf"])))
    assert outputs[0][:2] == outputs[1][:2]
    np.testing.assert_array_equal(outputs[0][2], outputs[1][2])
    nxt = RandNextImaged(prob=1.0)
    nxt.set_random_state(seed=0)
    moved = nxt(data)
    assert moved["next_image"]
    assert np.abs(sitk.GetArrayViewFromImage(moved["image"]) - sitk.GetArrayViewFromImage(image)).mean() > 5
    assert sitk.GetArrayViewFromImage(moved["lung_mask"]).sum() > 0
