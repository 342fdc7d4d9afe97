"""Test helpers: the chest phantom, a small synthetic registered pair and tiny training data, made on the fly; fast
re-registration settings."""
