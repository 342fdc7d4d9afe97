"""Registration misalignment bundle: custom code referenced from the configs as ``scripts.*``."""
