"""Shared constants (class thresholds, HU values, patch sizes), atomic file writes and file digests.

May import: nothing of scripts."""
