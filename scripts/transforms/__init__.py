"""Array and dictionary transforms: the image pyramid, body/lung masks, artificial DVFs and intensity changes,
the evaluation deformation and the training HU noise.

May import: scripts.utils."""
