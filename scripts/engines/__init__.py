"""Training: ignite trainer glue, checkpoints and weight loading, losses, metrics, BatchNorm re-estimation,
patch prediction and validation, the class-weights fit.

May import: scripts.utils, scripts.transforms, scripts.networks, scripts.data, scripts.registration,
scripts.inferers."""
