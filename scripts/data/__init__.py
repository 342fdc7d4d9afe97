"""Image and landmark files (read, check, write), DIR-Lab readers, landmark selection, artificial pairs on disk
(prepare_data), patch sampling and the training/validation patch streams.

May import: scripts.utils, scripts.transforms."""
