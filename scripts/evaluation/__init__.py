"""Evaluation: landmark metrics, the simulated landmark benchmark and its report, the baselines (RegNet-t, local
NCC) and the deformation gallery.

May import: scripts.utils, scripts.transforms, scripts.networks, scripts.data, scripts.registration, scripts.inferers,
scripts.engines."""
