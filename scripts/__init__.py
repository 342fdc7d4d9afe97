"""Registration misalignment bundle: custom code referenced from the configs as ``scripts.<package>.<module>``.

Packages, lowest layer first; each may import only the ones before it (its ``__init__`` names them, and
tests/test_layering.py checks every import): utils, transforms, networks, data, registration, inferers, engines,
evaluation, workflows."""
