"""The re-registration's calibration as inference reads it: piecewise-linear tables that map the residual |r| a
second registration finds to class probabilities P(correct), P(poor), P(wrong), an expected misalignment in mm and
the labels of the mean-F1 decision. Applied with ``numpy.interp``: inference needs neither scikit-learn nor a pickle.
The tables are fitted by ``scripts.registration.calibration``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scripts.registration.reregistration import ReregistrationOptions
from scripts.utils.class_decision import weighted_argmax
from scripts.utils.constants import CLASS_NAMES, CLASS_THRESHOLDS_MM

logger = logging.getLogger(__name__)


def options_sha256(options: ReregistrationOptions) -> str:
    """A digest of the estimator settings that change r (the thread count does not)."""
    settings = {k: v for k, v in sorted(asdict(options).items()) if k != "threads"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class ResidualCalibration:
    """Piecewise-linear maps of |r| (mm): ``p_at_least`` for the 3 and 6 mm thresholds, and ``expected_mm``.

    Args:
        knots_mm: increasing |r| values of the tables.
        p_at_least_3: P(e >= 3 mm) at the knots (increasing).
        p_at_least_6: P(e >= 6 mm) at the knots (increasing, <= p_at_least_3).
        expected_mm: E[e] at the knots (increasing).
        options_sha256: digest of the estimator settings the tables were fitted for ("" if none).
        class_weights: ``[1, w_poor, w_wrong]`` of the mean-F1 decision labels = argmax(w * p), fitted on the same
            training voxels (``scripts.utils.class_decision``); None: the plain argmax. The probabilities stay as
            calibrated; only the labels use the weights.
    """

    knots_mm: list[float]
    p_at_least_3: list[float]
    p_at_least_6: list[float]
    expected_mm: list[float]
    options_sha256: str = ""
    class_weights: list[float] | None = None

    @classmethod
    def thresholds(cls) -> "ResidualCalibration":
        """No calibration: |r| thresholded at 3 and 6 mm (one-hot probabilities) and E[e] = |r|."""
        lo, hi = CLASS_THRESHOLDS_MM
        eps = 1e-6
        return cls(
            [0.0, lo - eps, lo, hi - eps, hi, 1000.0],
            [0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1],
            [0.0, lo - eps, lo, hi - eps, hi, 1000.0],
        )

    def decide(self, probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
        """Labels of ``probabilities`` (classes along ``axis``): argmax(class_weights * p), or the plain argmax.

        Args:
            probabilities: class probabilities, classes along ``axis``.
            axis: the class axis.

        Returns:
            int array of labels.
        """
        return weighted_argmax(probabilities, self.class_weights, axis)

    def predict(self, magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``[3, *magnitude.shape]`` (correct, poor, wrong) and expected error (mm) of ``|r|``."""
        x = np.asarray(magnitude, dtype=np.float64)
        p3 = np.interp(x, self.knots_mm, self.p_at_least_3)
        p6 = np.minimum(np.interp(x, self.knots_mm, self.p_at_least_6), p3)
        probabilities = np.stack([1.0 - p3, p3 - p6, p6]).astype(np.float32)
        return probabilities, np.interp(x, self.knots_mm, self.expected_mm).astype(np.float32)

    def to_json(self, **extra) -> str:
        """The JSON record (tables + ``extra`` fields such as the fit's scores)."""
        return json.dumps({**asdict(self), **extra}, indent=1)

    @classmethod
    def read(cls, path: str | Path, options: ReregistrationOptions | None = None) -> "ResidualCalibration":
        """The calibration of a JSON file; a clear error names a missing or malformed file. A file fitted for other
        estimator settings than ``options`` is refused with a warning: plain thresholds are used instead.

        Args:
            path: calibration JSON file.
            options: estimator settings the file must have been fitted for; None skips the check.

        Returns:
            The ``ResidualCalibration``, or ``ResidualCalibration.thresholds()`` for a file of other settings.

        Raises:
            FileNotFoundError: when ``path`` does not exist.
            ValueError: when the file is not a calibration file, its tables are inconsistent or its class weights are
                invalid.
        """
        path = Path(path)
        try:
            record = json.loads(path.read_text())
            tables = [list(map(float, record[k])) for k in ("knots_mm", "p_at_least_3", "p_at_least_6", "expected_mm")]
            weights = record.get("class_weights")
            weights = None if weights is None else [float(w) for w in weights]
            out = cls(*tables, str(record.get("options_sha256", "")), weights)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{path}: calibration file not found (--calibration_file '' for thresholds)"
            ) from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a calibration file ({type(err).__name__}: {err})") from err
        lengths = {len(out.knots_mm), len(out.p_at_least_3), len(out.p_at_least_6), len(out.expected_mm)}
        if len(lengths) != 1 or len(out.knots_mm) < 2 or np.any(np.diff(out.knots_mm) < 0):
            raise ValueError(f"{path}: the calibration tables must have one increasing knot per value")
        if out.class_weights is not None and (
            len(out.class_weights) != len(CLASS_NAMES) or not all(np.isfinite(w) and w > 0 for w in out.class_weights)
        ):
            raise ValueError(
                f"{path}: class_weights must be {len(CLASS_NAMES)} positive numbers, got {out.class_weights}"
            )
        if options is not None and out.options_sha256 and out.options_sha256 != options_sha256(options):
            logger.warning("%s was fitted for other re-registration settings: ignored, |r| is thresholded", path)
            return cls.thresholds()
        return out
