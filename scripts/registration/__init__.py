"""Conventional registration with itk-elastix: the evaluation protocol's settings, the re-registration estimator
of the residual misalignment, its calibration, and registered artificial pairs.

May import: scripts.utils, scripts.transforms, scripts.data."""
