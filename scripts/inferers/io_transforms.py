"""MONAI dictionary transforms that make configs/inference.json read like a recipe: load and check a pair, then
write the misalignment map, the probabilities, the landmark table and the overlay after inference.

Arrays in the data dictionaries are channel-first ``[C, z, y, x]`` on the working LPS grid of the fixed image (1 mm
for the network, the fixed image's own voxels for the re-registration; SimpleITK's numpy order), the order
``scripts.networks.misalignment_net.MisalignmentNet`` reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.data.image_io import Grid, InputError, error_to_fixed_grid, image_stem, load_pair, to_fixed_grid
from scripts.data.landmark_csv import read_landmarks
from scripts.data.landmarks import read_landmarks_in_image, sample_nearest, write_landmark_predictions
from scripts.inferers.overlay import save_overlay
from scripts.registration.reregistration import RegistrationError
from scripts.utils.atomic_write import atomic_write_image
from scripts.utils.class_decision import weighted_argmax

logger = logging.getLogger(__name__)

UNTRAINED_WARNING = (
    "UNTRAINED weights (models/model.pt not found): the misalignment map is NOT a prediction, it only shows that "
    "the pipeline runs"
)


CONSTANT_MAP_STD = 1e-3  # class probabilities varying less than this over the mask: a constant map
CONSTANT_MAP_NOTE = "the map is constant (same probabilities everywhere): the weights look untrained or collapsed"
CONSTANT_MAP_WARNING = f"{CONSTANT_MAP_NOTE}; it is not a useful prediction"


def _path(value: Any) -> str:
    """A path from a data-dictionary value (``""``/None for none; a one-item list after MONAI collation)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value)


class LoadMisalignmentPaird(MapTransform):
    """Read and check the fixed and moving images (+ optional mask file and landmark table) and put the pair on the
    fixed image's LPS working grid: ``image [2, z, y, x]`` HU (fixed, moving), ``mask [1, z, y, x]`` (where to
    predict), ``region [1, z, y, x]`` (the fixed image's body and lungs inside the moving image's field of view),
    ``spacing [3]`` (x, y, z mm of the working grid), ``grid`` and ``fixed_grid`` (geometry arrays used to write the
    results back on the fixed grid).

    Every check happens here, before inference, so a bad input stops the run before any output is written.

    Args:
        keys: the data keys of the fixed and the moving image paths.
        mask_path_key: key of an optional prediction mask file ("" for none).
        landmarks_key: key of an optional landmark CSV ("" for none).
        spacing: isotropic working grid in mm (the network's 1 mm); None: the fixed image's own voxels, no finer
            than 1 mm per axis (the re-registration's grid).
        mask_background: set each image to the background HU outside its own body and lungs (the network's input).
        require_lung: refuse a pair whose region holds no lung (the network was trained on lungs).
    """

    def __init__(
        self,
        keys: KeysCollection = ("fixed", "moving"),
        mask_path_key: str = "mask_path",
        landmarks_key: str = "landmarks",
        spacing: float | None = 1.0,
        mask_background: bool = True,
        require_lung: bool = False,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name the fixed and the moving image, got {self.keys}")
        self.mask_path_key = mask_path_key
        self.landmarks_key = landmarks_key
        self.spacing = spacing
        self.mask_background = mask_background
        self.require_lung = require_lung

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        fixed_path, moving_path = (_path(d[k]) for k in self.keys)
        mask_path = _path(d.get(self.mask_path_key))
        landmarks_path = _path(d.get(self.landmarks_key))
        pair = load_pair(
            fixed_path, moving_path, mask_path or None, self.spacing, self.mask_background, self.require_lung
        )
        if landmarks_path:
            read_landmarks_in_image(landmarks_path, pair.fixed_grid, fixed_path)  # fails here, before any output
        logger.info(
            "pair on a %s voxel %s mm grid (fixed %s, moving %s), %d voxels to predict",
            list(pair.grid.size),
            np.round(pair.grid.spacing, 2).tolist(),
            fixed_path,
            moving_path,
            int(pair.mask.sum()),
        )
        d["image"] = torch.from_numpy(pair.image)
        d["mask"] = torch.from_numpy(pair.mask[None])
        d["region"] = torch.from_numpy(pair.region[None])
        d["spacing"] = torch.tensor(pair.grid.spacing, dtype=torch.float64)
        d["grid"] = pair.grid.as_arrays()
        d["fixed_grid"] = pair.fixed_grid.as_arrays()
        d[self.mask_path_key] = mask_path
        d[self.landmarks_key] = landmarks_path
        return d


def split_prediction(pred: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Probabilities ``[3, z, y, x]`` and step classes ``[S, z, y, x]`` (or None) from the inferer's output."""
    if isinstance(pred, Mapping):
        steps = pred.get("step_classes")
        return _numpy(pred["probabilities"]), None if steps is None else _numpy(steps)
    return _numpy(pred), None


def expected_error(pred: Any) -> Optional[np.ndarray]:
    """The expected misalignment ``[z, y, x]`` in mm of a method that estimates one (the re-registration), or None."""
    if isinstance(pred, Mapping) and pred.get("error_mm") is not None:
        error = _numpy(pred["error_mm"])
        return error.reshape(error.shape[-3:])
    return None


def decision_weights(pred: Any) -> Optional[np.ndarray]:
    """The class weights ``[3]`` of a method whose labels are argmax(w * p) while its probabilities are written as
    they are (the re-registration's mean-F1 decision: its probabilities stay calibrated), or None (plain argmax)."""
    if isinstance(pred, Mapping) and pred.get("class_weights") is not None:
        return _numpy(pred["class_weights"]).reshape(-1)[:3].astype(np.float64)
    return None


def landmark_columns(pred: Any, grid: Grid, points: np.ndarray) -> Dict[str, np.ndarray]:
    """Extra landmark columns of methods with a misalignment estimate: ``error_mm`` (expected misalignment) and
    ``residual_mm`` (|r| of the re-registration, before calibration).

    Args:
        pred: the inferer's output (a mapping with ``error_mm`` and/or ``residual_mm`` for methods that estimate them).
        grid: working grid of the prediction.
        points: ``[N, 3]`` landmark points, LPS mm (x-y-z order).

    Returns:
        Dict column name -> ``[N]`` values in mm; empty for methods without an estimate.
    """
    columns = {}
    error = expected_error(pred)
    if error is not None:
        columns["error_mm"] = sample_nearest(error[None], grid, points)[:, 0]
    if isinstance(pred, Mapping) and pred.get("residual_mm") is not None:
        residual = _numpy(pred["residual_mm"])
        magnitude = np.linalg.norm(residual.reshape(residual.shape[-4:]), axis=0)
        columns["residual_mm"] = sample_nearest(magnitude[None], grid, points)[:, 0]
    return columns


def assessed_landmarks(data: Mapping[Hashable, Any], points: np.ndarray) -> np.ndarray:
    """Which landmarks ``[N, 3]`` were assessed (bool ``[N]``): inside the fixed image, the working grid and the
    prediction mask (the region: body and lungs inside the moving image's field of view).

    Args:
        data: data dictionary with ``grid``, ``fixed_grid`` and ``mask`` (``LoadMisalignmentPaird``).
        points: ``[N, 3]`` landmark points, LPS mm (x-y-z order).

    Returns:
        bool array ``[N]``.
    """
    grid = Grid.from_arrays(data["grid"])
    inside = Grid.from_arrays(data["fixed_grid"]).contains(points) & grid.contains(points)
    mask = _numpy(data["mask"]).reshape((1,) + tuple(grid.size[::-1]))
    return inside & (sample_nearest(mask, grid, points)[:, 0] > 0)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.dtype == torch.bfloat16 else value
        return value.numpy()
    return np.asarray(value)


class _OutputWriter(MapTransform):
    """Base of the output transforms: output folder and the ``<moving stem>_<suffix>`` naming."""

    def __init__(self, output_dir: str | os.PathLike, keys: KeysCollection = "pred", moving_key: str = "moving"):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.moving_key = moving_key

    def output_path(self, data: Mapping[Hashable, Any], suffix: str) -> Path:
        """``<output_dir>/<stem of the moving image>_<suffix>``.

        Args:
            data: data dictionary holding the moving image path under ``moving_key``.
            suffix: file name suffix, e.g. "landmarks.csv".

        Returns:
            The output path.
        """
        return self.output_dir / f"{image_stem(_path(data[self.moving_key]))}_{suffix}"


class SaveMisalignmentMapsd(_OutputWriter):
    """Write ``<stem>_misalignment.nii.gz`` (uint8 0 correct, 1 poor, 2 wrong), ``<stem>_probabilities.nii.gz``
    (float32, 3 components per voxel) and, for methods that estimate it, ``<stem>_error_mm.nii.gz`` (float32, the
    expected misalignment in mm) on the fixed image's grid and geometry; 0 outside the mask."""

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        probabilities, _ = split_prediction(d[self.keys[0]])
        mask = _numpy(d["mask"])[0].astype(bool)
        fixed_grid = Grid.from_arrays(d["fixed_grid"])
        grid = Grid.from_arrays(d["grid"])
        weights = decision_weights(d[self.keys[0]])
        probs, labels, mask_on_fixed = to_fixed_grid(probabilities, mask, grid, fixed_grid, weights)
        outputs = [("probabilities.nii.gz", probs), ("misalignment.nii.gz", labels)]
        error = expected_error(d[self.keys[0]])
        if error is not None:
            outputs.append(("error_mm.nii.gz", error_to_fixed_grid(error, grid, fixed_grid, mask_on_fixed)))
        for suffix, values in outputs:
            path = atomic_write_image(fixed_grid.image(values), self.output_path(d, suffix))
            logger.debug("wrote %s", path)
        return d


class SaveLandmarkPredictionsd(_OutputWriter):
    """With a landmark table: write ``<stem>_landmarks.csv`` (its columns + inside, pred, p_correct, p_poor, p_wrong
    and step1, step2 of the LSTM), read at the working-grid voxel nearest to each landmark; a landmark outside the
    assessed region gets ``inside`` 0 and empty predictions, and one warning counts them."""

    def __init__(self, output_dir: str | os.PathLike, keys: KeysCollection = "pred", landmarks_key: str = "landmarks"):
        super().__init__(output_dir, keys)
        self.landmarks_key = landmarks_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        landmarks_path = _path(d.get(self.landmarks_key))
        if not landmarks_path:
            return d
        probabilities, steps = split_prediction(d[self.keys[0]])
        grid = Grid.from_arrays(d["grid"])
        table = read_landmarks(landmarks_path)
        step_values = None if steps is None else sample_nearest(steps, grid, table.points())
        inside = assessed_landmarks(d, table.points())
        if not inside.all():
            logger.warning(
                "%d of %d landmarks of %s lie outside the assessed region (the fixed image's body and lungs inside "
                "the moving image's field of view): not assessed, 'inside' 0 and an empty 'pred' in the table",
                int((~inside).sum()),
                len(inside),
                landmarks_path,
            )
        path = write_landmark_predictions(
            self.output_path(d, "landmarks.csv"),
            table,
            sample_nearest(probabilities, grid, table.points()),
            step_values,
            landmark_columns(d[self.keys[0]], grid, table.points()),
            decision_weights(d[self.keys[0]]),
            inside,
        )
        logger.debug("wrote %s", path)
        return d


class SaveOverlayd(_OutputWriter):
    """Write ``<stem>_overlay.png``: fixed, deformed moving and the green/yellow/red map on an axial and a coronal
    slice (landmarks drawn if given), plus the expected error in mm with a colour bar for methods that estimate it;
    the title says so plainly when the weights are untrained."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        keys: KeysCollection = "pred",
        landmarks_key: str = "landmarks",
        trained: bool = True,
    ) -> None:
        super().__init__(output_dir, keys)
        self.landmarks_key = landmarks_key
        self.trained = trained

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        probabilities, _ = split_prediction(d[self.keys[0]])
        mask = _numpy(d["mask"])[0].astype(bool)
        labels = np.where(mask, weighted_argmax(probabilities, decision_weights(d[self.keys[0]]), axis=0), -1)
        constant = bool(mask.any()) and float(probabilities[:, mask].std(axis=1).max()) < CONSTANT_MAP_STD
        if constant:
            logger.warning(CONSTANT_MAP_WARNING)
        landmarks_path = _path(d.get(self.landmarks_key))
        table = read_landmarks(landmarks_path) if landmarks_path else None
        path = save_overlay(
            self.output_path(d, "overlay.png"),
            _numpy(d["image"]),
            labels,
            Grid.from_arrays(d["grid"]),
            table,
            assessed=None if table is None else assessed_landmarks(d, table.points()),
            title=f"{image_stem(_path(d[self.moving_key]))}",
            trained=self.trained,
            note=CONSTANT_MAP_NOTE if constant and self.trained else "",
            error_mm=expected_error(d[self.keys[0]]),
        )
        logger.debug("wrote %s", path)
        if not self.trained:
            logger.warning(UNTRAINED_WARNING)
        return d


class BadInputExit(SystemExit):
    """Ends a bundle run on a bad input with one message naming the file and the problem (the original error is
    the ``__cause__``). A SystemExit, so that MONAI's config machinery does not wrap it in RuntimeErrors."""


def run_reporting_input_errors(evaluator: Any) -> Any:
    """Run ``evaluator``; a bad input (an ``InputError``, ``ValueError`` or ``OSError`` at the root of the chain
    of errors that MONAI's transform machinery wraps around it) ends the run with ``BadInputExit`` whose message is
    that error's: the file and the problem."""
    try:
        return evaluator.run()
    except Exception as error:
        root: BaseException = error
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, (InputError, ValueError, OSError, RegistrationError)):
            logger.error("bad input: %s", root)
            raise BadInputExit(f"bad input: {root}") from root
        raise


def log_weights_status(trained: bool, checkpoint: str, log: Callable[..., None] = logger.warning) -> bool:
    """Say plainly in the log whether trained weights were found (returns ``trained``).

    Args:
        trained: whether trained weights were found.
        checkpoint: path of the weights, logged when trained.
        log: logging function of the untrained warning.

    Returns:
        ``trained``.
    """
    if trained:
        logger.info("loading trained weights from %s", checkpoint)
    else:
        log(UNTRAINED_WARNING)
    return trained
