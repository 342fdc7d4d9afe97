"""PNG gallery of the artificial deformations on a real scan, and mask check PNGs.

    python -m scripts.evaluation.deformation_gallery gallery --scan <dataset_dir>/thorax_lungpetctdx_A0001.nii.gz \
        --output_dir docs/images
    python -m scripts.evaluation.deformation_gallery masks --data_dir <dataset_dir> --output_dir /tmp/mask_check

Each gallery PNG shows, in a coronal and an axial slice through the lungs: the fixed image, the deformed image,
their difference, |u| as a colour overlay and the Jacobian determinant of x + u.
"""

from __future__ import annotations

from pathlib import Path

import fire
import matplotlib
import numpy as np
import SimpleITK as sitk

from scripts.data.prepare_data import find_scans, resample_isotropic, scan_name
from scripts.transforms.artificial_dvf import RandArtificialDVFd, dvf_from_sitk, dvf_settings, upsample_dvf
from scripts.transforms.artificial_intensity import RandNextImaged, apply_background, deform_image, dense_jacobian
from scripts.transforms.ct_masks import ct_masks

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GALLERY_TYPES = ("respiratory_motion", "single_frequency", "mixed_frequency", "identity", "next_image")


def _slices(volume: np.ndarray, z: int, y: int) -> list[np.ndarray]:
    """Coronal (head up) and axial slices of a ``(z, y, x)`` volume."""
    return [volume[::-1, y, :], volume[z]]


def _load(scan: str):
    image = resample_isotropic(sitk.ReadImage(str(scan), sitk.sitkFloat32))
    body, lung = ct_masks(image, str(scan))
    return image, body, lung


def gallery(
    scan: str,
    output_dir: str = "docs/images",
    max_deformation_mm: float = 10.0,
    seed: int = 0,
    types=GALLERY_TYPES,
    variant: int = 3,
    dpi: int = 60,
) -> list[str]:
    """Write ``gallery_<type>.png`` for each type ("next_image": a single-frequency DVF on the next image).

    Args:
        scan: CT file.
        output_dir: folder of the PNGs (created if missing).
        max_deformation_mm: maximum deformation M, mm.
        seed: seed of each type's draw.
        types: DVF type name(s) (``DVF_TYPES`` or "next_image"), a string or a sequence.
        variant: parameter variant, taken modulo the type's number of variants.
        dpi: resolution of the PNGs.

    Returns:
        Paths of the written PNGs.
    """
    image, body, lung = _load(scan)
    settings = dvf_settings(max_deformation_mm)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    lung_zyx = np.nonzero(sitk.GetArrayViewFromImage(lung))
    z, y = int(np.median(lung_zyx[0])), int(np.median(lung_zyx[1]))
    for kind in [types] if isinstance(types, str) else types:
        rng = np.random.RandomState(seed)
        data = {"image": image, "body_mask": body, "lung_mask": lung}
        if kind == "next_image":
            step = RandNextImaged(settings=settings)
            step.set_random_state(state=rng)
            data = step(data)
        dvf_type = "single_frequency" if kind == "next_image" else kind
        draw = RandArtificialDVFd(settings=settings, dvf_type=dvf_type, variant=variant % settings.variants(dvf_type))
        draw.set_random_state(state=rng)
        data = draw(data)
        deformed, _ = deform_image(rng, data["image"], data["dvf"], data["body_mask"])
        fixed = sitk.GetArrayFromImage(apply_background(data["image"], data["body_mask"]))
        moved = sitk.GetArrayFromImage(deformed)
        factor = int(round(data["dvf"].GetSpacing()[0] / image.GetSpacing()[0]))
        u = upsample_dvf(dvf_from_sitk(data["dvf"]), factor, fixed.shape).numpy()
        magnitude = np.sqrt((u**2).sum(0))
        jac = dense_jacobian(data["dvf"], fixed.shape, factor)
        inside = sitk.GetArrayViewFromImage(data["body_mask"]) > 0
        fig, axes = plt.subplots(2, 5, figsize=(16, 6.2), constrained_layout=True)
        hu = dict(cmap="gray", vmin=-1000, vmax=300)
        for row, (f, m, mag, j, b) in enumerate(
            zip(*(_slices(v, z, y) for v in (fixed, moved, magnitude, jac, inside)))
        ):
            axes[row, 0].imshow(f, **hu)
            axes[row, 1].imshow(m, **hu)
            diff = np.where(b, m - f, 0)
            axes[row, 2].imshow(diff, cmap="RdBu_r", vmin=-400, vmax=400)
            axes[row, 3].imshow(f, **hu)
            im3 = axes[row, 3].imshow(
                np.ma.masked_where(~b, mag), cmap="jet", vmin=0, vmax=1.2 * max_deformation_mm, alpha=0.5
            )
            im4 = axes[row, 4].imshow(np.ma.masked_where(~b, j), cmap="coolwarm", vmin=0.6, vmax=1.4)
        for ax, title in zip(axes[0], ("fixed", "deformed", "deformed - fixed (±400 HU)", "|u| (mm)", "det J")):
            ax.set_title(title)
        for ax in axes.ravel():
            ax.axis("off")
        fig.colorbar(im3, ax=axes[:, 3], shrink=0.5)
        fig.colorbar(im4, ax=axes[:, 4], shrink=0.5)
        inside_u = magnitude[inside]
        fig.suptitle(
            f"{kind} on {scan_name(Path(scan))} (M = {max_deformation_mm} mm, seed {seed}): |u| in body median "
            f"{np.median(inside_u):.1f}, 99th pct {np.percentile(inside_u, 99):.1f}, max {inside_u.max():.1f} mm; "
            f"det J in [{jac[inside].min():.2f}, {jac[inside].max():.2f}]"
        )
        path = out_dir / f"gallery_{kind}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(str(path))
        print(path)
    return written


def masks(data_dir: str, output_dir: str = "/tmp/mask_check", dpi: int = 60) -> list[str]:
    """Write ``mask_<scan>.png``: body (yellow) and lung (red) contours on three slices of each scan at 1 mm.

    Args:
        data_dir: folder of the CT scans.
        output_dir: folder of the PNGs (created if missing).
        dpi: resolution of the PNGs.

    Returns:
        Paths of the written PNGs.
    """
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in find_scans(data_dir):
        image, body, lung = _load(str(path))
        im, b, lu = (sitk.GetArrayFromImage(v) for v in (image, body, lung))
        z, y, x = (int(np.median(i)) for i in np.nonzero(lu))
        fig, axes = plt.subplots(1, 3, figsize=(15, 5), constrained_layout=True)
        for ax, sl in zip(axes, [np.s_[z], np.s_[::-1, y], np.s_[::-1, :, x]]):
            ax.imshow(im[sl], cmap="gray", vmin=-1000, vmax=400)
            ax.contour(b[sl], [0.5], colors="y")
            ax.contour(lu[sl], [0.5], colors="r")
            ax.axis("off")
        fig.suptitle(f"{scan_name(path)}: body {b.sum() / 1e3:.0f} ml, lung {lu.sum() / 1e3:.0f} ml")
        target = out_dir / f"mask_{scan_name(path)}.png"
        fig.savefig(target, dpi=dpi)
        plt.close(fig)
        written.append(str(target))
        print(target)
    return written


if __name__ == "__main__":
    fire.Fire({"gallery": gallery, "masks": masks})
