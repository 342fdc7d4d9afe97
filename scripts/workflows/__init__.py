"""Workflows built on the bundle's inference config: batch QA of many registered pairs (one process or sharded
over torchrun processes) and the MONAI Label inference task for 3D Slicer.

May import: scripts.utils, scripts.transforms, scripts.networks, scripts.data, scripts.registration, scripts.inferers,
scripts.engines, scripts.evaluation."""
