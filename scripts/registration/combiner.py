"""The multiview combiner as inference reads it: gradient-boosted trees (LightGBM) over the views of a pair
(``scripts.registration.views``) that give P(e >= 3 mm), P(e >= 6 mm) and an expected misalignment in mm, with
isotonic tables that calibrate the two probabilities (fitted on out-of-fold predictions) and the mean-F1 class
weights. One JSON file holds it all: LightGBM's own text models, parsed without running code (no pickle), and the
sha256 of the view and re-registration settings it was fitted for; a file of other settings is refused by name.
The combiner is fitted by ``scripts.registration.combiner_fit``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scripts.registration.calibration_tables import options_sha256
from scripts.registration.reregistration import ReregistrationOptions
from scripts.registration.views import ViewOptions
from scripts.utils.class_decision import weighted_argmax
from scripts.utils.constants import CLASS_NAMES

FORMAT = "misalignment-view-combiner/1"
MODELS = ("at_least_3", "at_least_6", "expected_mm")
# what the regressor predicts: the error itself (mm, capped), or log(1 + e) - log(1 + |r|), a correction of |r| that is
# near 0 where |r| already measures the error (large errors), so the trees need not rebuild |r| from their bins
EXPECTED_TARGETS = ("error_mm", "log_ratio_to_r")


def expected_error(raw: np.ndarray, log1p_r: np.ndarray, target: str = "error_mm") -> np.ndarray:
    """The expected misalignment (mm, >= 0) from the regressor's raw output for ``target`` (``EXPECTED_TARGETS``).

    Args:
        raw: ``[N]`` regressor outputs.
        log1p_r: ``[N]`` the ``log1p_r`` feature of the same voxels.
        target: what the regressor was fitted to predict.

    Returns:
        float32 ``[N]``.

    Raises:
        ValueError: for an unknown target.
    """
    if target == "error_mm":
        return np.clip(raw, 0.0, None).astype(np.float32)
    if target == "log_ratio_to_r":
        return np.clip(np.expm1(np.asarray(log1p_r, dtype=np.float64) + raw), 0.0, None).astype(np.float32)
    raise ValueError(f"unknown expected-error target {target!r}; choose one of {EXPECTED_TARGETS}")


class CombinerMismatch(ValueError):
    """The combiner file was fitted for other view or re-registration settings than the run's."""


def _booster(model_text: str):
    import lightgbm

    return lightgbm.Booster(model_str=model_text)


@dataclass
class ViewCombiner:
    """Boosted trees and calibration tables over the view features.

    Args:
        features: feature names, in the order the models read them.
        models: LightGBM text models by name (``MODELS``): two binary classifiers and one regressor.
        calibration: per probability (``at_least_3``, ``at_least_6``) the isotonic table ``{"knots", "values"}``
            from the raw tree output to the calibrated probability.
        view_options: the ``ViewOptions`` fields it was fitted for.
        views_sha256: ``ViewOptions.sha256()`` of those settings.
        reregistration_sha256: ``options_sha256`` of the re-registration settings of its residuals.
        class_weights: ``[1, w_poor, w_wrong]`` of the mean-F1 decision, or None for the plain argmax.
        scores: the fit's scores (kept with the file for the record).
        expected_target: what the ``expected_mm`` regressor predicts (``EXPECTED_TARGETS``).
    """

    features: list[str]
    models: dict[str, str]
    calibration: dict[str, dict[str, list[float]]]
    view_options: dict
    views_sha256: str
    reregistration_sha256: str
    class_weights: list[float] | None = None
    scores: dict = field(default_factory=dict)
    expected_target: str = "error_mm"

    def __post_init__(self) -> None:
        self._boosters: dict = {}
        if self.expected_target not in EXPECTED_TARGETS:
            raise ValueError(f"unknown expected_target {self.expected_target!r}; choose one of {EXPECTED_TARGETS}")

    def booster(self, name: str):
        """The LightGBM booster of model ``name``, parsed on first use."""
        if name not in self._boosters:
            self._boosters[name] = _booster(self.models[name])
        return self._boosters[name]

    def raw(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Uncalibrated outputs of the three models for ``features [N, len(self.features)]``."""
        x = np.ascontiguousarray(features, dtype=np.float64)
        return {name: self.booster(name).predict(x, num_threads=0) for name in MODELS}

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated class probabilities ``[N, 3]`` (correct, poor, wrong) and expected error ``[N]`` (mm).

        Args:
            features: ``[N, len(self.features)]`` view features.

        Returns:
            Tuple ``(probabilities, expected_mm)``.
        """
        raw = self.raw(features)
        p3 = self.calibrated("at_least_3", raw["at_least_3"])
        p6 = np.minimum(self.calibrated("at_least_6", raw["at_least_6"]), p3)
        probabilities = np.stack([1.0 - p3, p3 - p6, p6], axis=1).astype(np.float32)
        log1p_r = np.asarray(features)[:, self.features.index("log1p_r")]
        return probabilities, expected_error(raw["expected_mm"], log1p_r, self.expected_target)

    def calibrated(self, name: str, raw: np.ndarray) -> np.ndarray:
        """The isotonic table of ``name`` applied to raw probabilities (identity without a table)."""
        table = self.calibration.get(name)
        if not table:
            return np.asarray(raw, dtype=np.float64)
        return np.interp(raw, table["knots"], table["values"])

    def decide(self, probabilities: np.ndarray, axis: int = 1) -> np.ndarray:
        """Labels argmax(class_weights * p) (the plain argmax without weights)."""
        return weighted_argmax(probabilities, self.class_weights, axis)

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    def check_settings(self, views: ViewOptions, reregistration: ReregistrationOptions, source: str) -> None:
        """Refuse a combiner fitted for other settings than ``views`` and ``reregistration``.

        Raises:
            CombinerMismatch: naming ``source`` and what differs.
        """
        if self.views_sha256 != views.sha256():
            raise CombinerMismatch(
                f"{source}: fitted for other view settings ({self.view_options}); refit it with "
                "scripts.registration.combiner_fit or run with the settings it names"
            )
        if self.reregistration_sha256 != options_sha256(reregistration):
            raise CombinerMismatch(
                f"{source}: fitted on residuals of other re-registration settings; refit it with "
                "scripts.registration.combiner_fit"
            )

    @classmethod
    def read(
        cls,
        path: str | Path,
        views: ViewOptions | None = None,
        reregistration: ReregistrationOptions | None = None,
    ) -> "ViewCombiner":
        """The combiner of a JSON file, checked against the run's settings when given.

        Args:
            path: combiner JSON file.
            views: the run's view settings (None: not checked).
            reregistration: the run's re-registration settings (None: not checked).

        Returns:
            The ``ViewCombiner``.

        Raises:
            FileNotFoundError: when ``path`` does not exist.
            ValueError: when the file is not a combiner file or its models do not parse.
            CombinerMismatch: when it was fitted for other settings.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: combiner file not found")
        try:
            record = json.loads(path.read_text())
            if record.get("format") != FORMAT:
                raise ValueError(f"format is {record.get('format')!r}, expected {FORMAT!r}")
            out = cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})
            missing = [m for m in MODELS if m not in out.models]
            if missing:
                raise ValueError(f"models missing: {missing}")
            for name in MODELS:
                out.booster(name)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a combiner file ({type(err).__name__}: {err})") from None
        except Exception as err:  # LightGBM's parser raises its own LightGBMError
            raise ValueError(f"{path}: its models do not parse ({type(err).__name__}: {err})") from None
        if out.class_weights is not None and len(out.class_weights) != len(CLASS_NAMES):
            raise ValueError(f"{path}: class_weights must be {len(CLASS_NAMES)} numbers")
        if views is not None and reregistration is not None:
            out.check_settings(views, reregistration, str(path))
        return out
