"""Shared constants (class thresholds, HU values, patch sizes), the encoders' input windows for an output block,
atomic file writes, file digests, the choice of floating-point precision and the mean-F1 class-decision fit (numpy).

May import: nothing of scripts."""
