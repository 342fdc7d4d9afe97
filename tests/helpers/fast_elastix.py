"""Re-registration settings for tests that check how a pair is handled, not how well it registers: a third of the
default's time on the sample pair (3 resolutions, fewer iterations and samples)."""

FAST_ELASTIX = {
    "number_of_resolutions": 3,
    "affine_iterations": 150,
    "bspline_iterations": 60,
    "number_of_spatial_samples": 1500,
    "asgd_estimation": "DisplacementDistribution",
}
