"""Inference: the tiled MisalignmentInferer, the re-registration inferer, the class-weighted decision, the pair
loading/saving dictionary transforms of configs/inference.json and the overlay PNG.

May import: scripts.utils, scripts.transforms, scripts.networks, scripts.data, scripts.registration."""
