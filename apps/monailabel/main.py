"""MONAI Label app for 3D Slicer: the registration misalignment map of a fixed CT and its registered moving CT.

The request's ``image`` is the fixed image (a datastore id, as Slicer sends it); the registered moving image comes in
the request's ``moving`` parameter (a datastore id or a path). The bundle's default method runs (or ``method`` from
the request or ``--conf bundle_overrides``) and the answer is a label map on the fixed grid: 0 outside the predicted
region, 1 correct (< 3 mm), 2 poor (3-6 mm), 3 wrong (>= 6 mm), with label names and colours (and the error map's
path and mean for methods that estimate one) in its parameters.

    monailabel start_server --app apps/monailabel --studies <folder with the images> \\
        [--conf bundle_python /path/to/bundle/env/bin/python] [--conf bundle_overrides '{"method": "network"}']

MONAI Label writes its logs into ``<app>/logs``; a copy of this file elsewhere works with ``MISALIGNMENT_BUNDLE_ROOT``
set to the bundle folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

BUNDLE_ROOT = Path(os.environ.get("MISALIGNMENT_BUNDLE_ROOT") or Path(__file__).resolve().parents[2])  # a copied app
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.workflows.label_request import LABEL_COLOURS, LABEL_VALUES, BundleRunError, infer_pair  # noqa: E402

logger = logging.getLogger(__name__)
MODEL_NAME = "misalignment"


class MisalignmentInferTask(InferTask):
    """Fixed image (the request's ``image``) + registered moving image (``moving``) -> correct/poor/wrong label map.

    Args:
        bundle_root: the bundle folder (configs/inference.json).
        python: the interpreter that runs the bundle (its own pinned environment).
        overrides: configs/inference.json overrides for every request (e.g. ``{"method": "network"}``).
    """

    def __init__(self, bundle_root: Path, python: str, overrides: Dict[str, Any]) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=dict(LABEL_VALUES),
            dimension=3,
            description="Registration misalignment of a fixed CT and its registered moving CT: correct (< 3 mm), "
            "poor (3-6 mm), wrong (>= 6 mm); give the moving image in 'moving' (an image id or a path)",
            config={"moving": "", "method": ""},
        )
        self.bundle_root = bundle_root
        self.python = python
        self.overrides = overrides

    def info(self) -> Dict[str, Any]:
        return {**super().info(), "label_colors": dict(LABEL_COLOURS)}

    def is_valid(self) -> bool:
        return (self.bundle_root / "configs" / "inference.json").is_file()

    def __call__(self, request: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        fixed, moving = str(request.get("image", "")), str(request.get("moving", ""))
        if not moving or not os.path.isfile(moving):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"give the registered moving image in the 'moving' parameter (an image id or a path); got {moving!r}",
            )
        overrides = dict(self.overrides)
        if request.get("method"):
            overrides["method"] = request["method"]
        try:
            return infer_pair(fixed, moving, self.bundle_root, overrides=overrides, python=self.python)
        except BundleRunError as error:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(error)) from None


class MisalignmentApp(MONAILabelApp):
    """MONAI Label app serving the bundle's misalignment map (one infer task, ``misalignment``)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.python = conf.get("bundle_python") or os.environ.get("MISALIGNMENT_BUNDLE_PYTHON") or sys.executable
        self.overrides = json.loads(conf.get("bundle_overrides") or "{}")
        metadata = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Registration misalignment (chest CT)",
            description=metadata.get("description", ""),
            version=metadata.get("version", ""),
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {MODEL_NAME: MisalignmentInferTask(BUNDLE_ROOT, self.python, self.overrides)}

    def init_trainers(self) -> Dict[str, Any]:
        return {}

    def infer(self, request: Dict[str, Any], datastore=None) -> Dict[str, Any]:
        """Resolve the ``moving`` image id to its file (a path is kept), then run the task on the fixed image; a bad
        request is answered with HTTP 400 and the reason (MONAI Label would answer a bare 500)."""
        moving = str(request.get("moving", ""))
        try:
            if moving and not os.path.exists(moving):
                store = datastore if datastore else self.datastore()
                try:
                    uri = store.get_image_uri(moving)
                except Exception:
                    uri = ""
                if not uri or not os.path.isfile(uri):
                    raise MONAILabelException(
                        MONAILabelError.INVALID_INPUT,
                        f"moving image {moving!r}: neither an image id of the datastore nor an image file",
                    )
                request = {**request, "moving": uri}
            return super().infer(request, datastore)
        except MONAILabelException as error:
            logger.error("misalignment request refused: %s", error.msg)
            raise HTTPException(status_code=400, detail=error.msg) from None
