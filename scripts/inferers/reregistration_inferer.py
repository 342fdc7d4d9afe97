"""The re-registration methods as MONAI inferers, so that configs/inference.json runs them through the same loading,
saving and overlay as the network: ``--method reregistration`` (|r| calibrated) and ``--method multiview`` (the
views of the pair combined by boosted trees)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import Inferer

from scripts.registration.calibration_tables import ResidualCalibration
from scripts.registration.combiner import ViewCombiner
from scripts.registration.reregistration import ReregistrationOptions, residual_field_on_pair
from scripts.registration.views import ViewOptions, compute_views
from scripts.transforms.ct_masks import body_mask_array

logger = logging.getLogger(__name__)

DECISIONS = ("weighted", "argmax")  # the re-registration's labels: mean-F1 class weights, or the plain argmax


class ReregistrationInferer(Inferer):
    """Re-register the moving channel onto the fixed channel with elastix and calibrate the residual |r|.

    Returns ``{"probabilities": [B, 3, z, y, x], "error_mm": [B, 1, z, y, x], "residual_mm": [B, 3, z, y, x]}``,
    zero outside ``mask`` (elastix samples ``region``, the fixed image's body and lungs inside the moving image's
    field of view, whatever the prediction mask), and with the "weighted" decision
    ``"class_weights": [B, 3]`` (the writers label argmax(w * p); the probabilities stay calibrated); the
    evaluator's ``network`` is not used.

    Args:
        calibration_file: JSON tables of ``scripts.registration.calibration``; "" thresholds |r| at 3 and 6 mm.
        decision: "weighted": labels = argmax(w * p) with the calibration file's mean-F1 class weights (the plain
            argmax if it has none); "argmax": the most probable class.
        spacing_mm: voxel size of the loaded pair when the batch does not give its ``spacing`` (x, y, z mm).
        working_spacing_mm: register on this isotropic grid (None or 0: the loaded pair's own grid).
        bspline_iterations: iterations per resolution of the B-spline stage.
        grid_spacing_mm: final B-spline control-point spacing.
        metric: elastix metric, "AdvancedMattesMutualInformation" or "AdvancedNormalizedCorrelation".
        threads: elastix threads.
        input_spacing_mm: the grid LoadMisalignmentPaird put the pair on (None: the fixed image's own voxels).
        mask_background: whether LoadMisalignmentPaird set the background outside the bodies (the calibration file
            must have been fitted on pairs loaded the same way: its settings hash says so).
        elastix_options: further ``ReregistrationOptions`` fields (e.g. ``{"number_of_spatial_samples": 1000}``);
            any change makes a calibration file fitted for other settings fall back to thresholds.
    """

    def __init__(
        self,
        calibration_file: str | Path = "",
        spacing_mm: float = 1.0,
        working_spacing_mm: float | None = ReregistrationOptions.working_spacing_mm,
        bspline_iterations: int = ReregistrationOptions.bspline_iterations,
        grid_spacing_mm: float = ReregistrationOptions.grid_spacing_mm,
        metric: str = ReregistrationOptions.metric,
        threads: int = 2,
        decision: str = "weighted",
        input_spacing_mm: float | None = ReregistrationOptions.input_spacing_mm,
        mask_background: bool = ReregistrationOptions.mask_background,
        elastix_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; choose one of {DECISIONS}")
        self.decision = decision
        settings = dict(
            working_spacing_mm=working_spacing_mm or None,
            bspline_iterations=int(bspline_iterations),
            grid_spacing_mm=float(grid_spacing_mm),
            metric=str(metric),
            threads=int(threads),
            input_spacing_mm=None if not input_spacing_mm else float(input_spacing_mm),
            mask_background=bool(mask_background),
        )
        self.options = ReregistrationOptions(**{**settings, **dict(elastix_options or {})})
        self.spacing_mm = float(spacing_mm)
        self.calibration_file = str(calibration_file or "")
        self._calibration: ResidualCalibration | None = None

    @property
    def calibration(self) -> ResidualCalibration:
        """The calibration tables, read on first use (a config that builds this inferer but runs the network does
        not need the file)."""
        if self._calibration is None:
            if self.calibration_file:
                self._calibration = ResidualCalibration.read(self.calibration_file, self.options)
            else:
                logger.warning("no calibration file: |r| of the re-registration is thresholded at 3 and 6 mm")
                self._calibration = ResidualCalibration.thresholds()
        return self._calibration

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Any = None,
        mask: torch.Tensor | None = None,
        name: Any = None,
        region: torch.Tensor | None = None,
        spacing: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``inputs [B, 2, z, y, x]`` (fixed, moving HU); ``mask`` where to predict, ``region`` where elastix
        samples (default: the fixed image's body and lungs), both ``[B, 1, z, y, x]``; ``spacing [B, 3]`` (x, y, z mm);
        ``name``: the pair's moving file(s), for error messages."""
        names = [name] if isinstance(name, str) else list(name or [])
        calibration = self.calibration  # a bad calibration file stops the run before the registration
        image = inputs.detach().cpu().float().numpy()
        batch = image.shape[0]
        predict = np.ones((batch,) + image.shape[2:], dtype=bool) if mask is None else _bool(mask)
        spacings = (
            np.full((batch, 3), self.spacing_mm) if spacing is None else np.asarray(spacing, dtype=float).reshape(-1, 3)
        )
        probabilities, errors, residuals = [], [], []
        for b in range(batch):
            pair = f"pair with moving image {names[b]}" if b < len(names) else "the pair"
            sampled = body_mask_array(image[b, 0], spacings[b][::-1]) if region is None else _bool(region)[b]
            residual = residual_field_on_pair(image[b], sampled, tuple(spacings[b]), self.options, name=pair)
            p, expected = calibration.predict(np.linalg.norm(residual, axis=0))
            probabilities.append(p * predict[b])
            errors.append((expected * predict[b])[None])
            residuals.append(residual * predict[b])
        device = inputs.device
        out = {
            "probabilities": torch.from_numpy(np.stack(probabilities)).to(device),
            "error_mm": torch.from_numpy(np.stack(errors)).to(device),
            "residual_mm": torch.from_numpy(np.stack(residuals)).to(device),
        }
        if self.decision == "weighted" and calibration.class_weights is not None:
            weights = torch.tensor(calibration.class_weights, dtype=torch.float32, device=device)
            out["class_weights"] = weights.expand(batch, -1).clone()
        return out


def _bool(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """A ``[B, 1, z, y, x]`` mask as bool ``[B, z, y, x]``."""
    values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return values[:, 0] > 0


class ResidualNetworkInferer(Inferer):
    """The residual-informed network (``MisalignmentNet(residual_input="lstm")``): re-register the pair, then run the
    tiled network on (fixed, moving, r).

    Returns the network's ``probabilities`` and ``step_classes`` (``MisalignmentInferer``) with the re-registration's
    ``error_mm`` and ``residual_mm`` (zero outside ``mask``).

    Args:
        reregistration: the ``ReregistrationInferer`` that finds r (its calibration gives ``error_mm``).
        network_inferer: the ``MisalignmentInferer`` that tiles the network.
    """

    def __init__(self, reregistration: ReregistrationInferer, network_inferer: Inferer) -> None:
        super().__init__()
        self.reregistration = reregistration
        self.network_inferer = network_inferer

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Any,
        mask: torch.Tensor | None = None,
        name: Any = None,
        region: torch.Tensor | None = None,
        spacing: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``inputs [B, 2, z, y, x]`` (fixed, moving HU) -> the dict above (``region``, ``spacing``: as for
        ``ReregistrationInferer``)."""
        found = self.reregistration(inputs, None, None, name, region, spacing)  # r everywhere: the tiles' halos need it
        with_residual = torch.cat([inputs.float(), found["residual_mm"].to(inputs.device, torch.float32)], dim=1)
        out = self.network_inferer(with_residual, network, mask)
        out = dict(out) if isinstance(out, dict) else {"probabilities": out}
        region = torch.ones_like(inputs[:, :1], dtype=torch.float32) if mask is None else (mask != 0).float()
        out["error_mm"] = found["error_mm"] * region
        out["residual_mm"] = found["residual_mm"] * region
        return out


class MultiviewInferer(Inferer):
    """The multiview estimator: the re-registration's r, the views of the pair (``scripts.registration.views``) and
    the calibrated combiner that reads them (``scripts.registration.combiner``).

    Returns the same dict as ``ReregistrationInferer`` (probabilities and ``error_mm`` from the combiner, the
    re-registration's ``residual_mm``, and with the "weighted" decision the combiner's ``class_weights``).

    Args:
        reregistration: the ``ReregistrationInferer`` that finds r (its options must be those the combiner was
            fitted on).
        combiner_file: the combiner JSON of ``scripts.registration.combiner_fit``.
        views: the views computed (must be the combiner's); None: ``ViewOptions``' default.
        working_spacing_mm: grid the views run on, mm (None: the pair's own grid).
        decision: "weighted" (the combiner's mean-F1 class weights) or "argmax".
    """

    def __init__(
        self,
        reregistration: ReregistrationInferer,
        combiner_file: str | Path,
        views: Sequence[str] | None = None,
        working_spacing_mm: float | None = ViewOptions.working_spacing_mm,
        decision: str = "weighted",
    ) -> None:
        super().__init__()
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; choose one of {DECISIONS}")
        self.reregistration = reregistration
        self.combiner_file = str(combiner_file)
        settings: dict[str, Any] = {"working_spacing_mm": working_spacing_mm or None}
        if views is not None:
            settings["views"] = tuple(views)
        self.view_options = ViewOptions(**settings)
        self.decision = decision
        self._combiner: ViewCombiner | None = None

    @property
    def combiner(self) -> ViewCombiner:
        """The combiner, read and checked against the run's settings on first use."""
        if self._combiner is None:
            self._combiner = ViewCombiner.read(self.combiner_file, self.view_options, self.reregistration.options)
        return self._combiner

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Any = None,
        mask: torch.Tensor | None = None,
        name: Any = None,
        region: torch.Tensor | None = None,
        spacing: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``inputs [B, 2, z, y, x]`` (fixed, moving HU) -> the dict above (``mask``, ``region``, ``spacing``,
        ``name``: as for ``ReregistrationInferer``)."""
        names = [name] if isinstance(name, str) else list(name or [])
        combiner = self.combiner  # a missing or mismatched combiner stops the run before the registration
        image = inputs.detach().cpu().float().numpy()
        batch, shape = image.shape[0], image.shape[2:]
        predict = np.ones((batch,) + shape, dtype=bool) if mask is None else _bool(mask)
        spacings = (
            np.full((batch, 3), self.reregistration.spacing_mm)
            if spacing is None
            else np.asarray(spacing, dtype=float).reshape(-1, 3)
        )
        probabilities, errors, residuals = [], [], []
        for b in range(batch):
            pair = f"pair with moving image {names[b]}" if b < len(names) else "the pair"
            sampled = body_mask_array(image[b, 0], spacings[b][::-1]) if region is None else _bool(region)[b]
            options = self.reregistration.options
            residual = residual_field_on_pair(image[b], sampled, tuple(spacings[b]), options, name=pair)
            features, _ = compute_views(image[b], residual, sampled, tuple(spacings[b]), self.view_options, pair)
            inside = np.flatnonzero(predict[b])
            p_flat, e_flat = combiner.predict(features.reshape(len(features), -1)[:, inside].T)
            p = np.zeros((3, predict[b].size), dtype=np.float32)
            expected = np.zeros(predict[b].size, dtype=np.float32)
            p[:, inside], expected[inside] = p_flat.T, e_flat
            probabilities.append(p.reshape((3,) + shape))
            errors.append(expected.reshape((1,) + shape))
            residuals.append(residual * predict[b])
        device = inputs.device
        out = {
            "probabilities": torch.from_numpy(np.stack(probabilities)).to(device),
            "error_mm": torch.from_numpy(np.stack(errors)).to(device),
            "residual_mm": torch.from_numpy(np.stack(residuals)).to(device),
        }
        if self.decision == "weighted" and combiner.class_weights is not None:
            weights = torch.tensor(combiner.class_weights, dtype=torch.float32, device=device)
            out["class_weights"] = weights.expand(batch, -1).clone()
        return out
