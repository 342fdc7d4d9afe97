"""MONAI Deploy app: the bundle's misalignment network (TorchScript ``model.ts`` from ``ckpt_export``) run by the
SDK's ``MonaiBundleInferenceOperator`` on a registered pair, writing the correct/poor/wrong map.

Operators: ``PairLoaderOperator`` (reads ``fixed.*`` and ``moving.*`` from the input folder and puts the pair on the
fixed image's 1 mm LPS grid, as the bundle does) -> ``MisalignmentBundleOperator`` (the SDK's bundle inference
operator, reading ``deploy_preprocessing`` / ``deploy_inferer`` / ``deploy_postprocessing`` from the configs embedded
in model.ts) -> ``MapWriterOperator`` (``<moving stem>_misalignment.nii.gz`` and ``_probabilities.nii.gz`` on the
fixed image's grid, written atomically).

Export the package once (it embeds configs/inference.json and apps/deploy/deploy.json)::

    python -m monai.bundle ckpt_export --net_id network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --config_file "['configs/inference.json','apps/deploy/deploy.json']" --meta_file configs/metadata.json

Run (the SDK's usual -i/-o/-m options; input folder with fixed.nii.gz and moving.nii.gz, any SimpleITK format)::

    python apps/deploy/app.py -i input_dir -o output_dir -m models/model.ts
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from holoscan.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's scripts package: its transforms and inferer are in model.ts

from scripts.data.image_io import Grid, image_stem, load_pair, to_fixed_grid  # noqa: E402
from scripts.utils.atomic_write import atomic_write_image  # noqa: E402

CONFIG_NAMES = BundleConfigNames(
    preproc_name="deploy_preprocessing",
    postproc_name="deploy_postprocessing",
    inferer_name="deploy_inferer",
    config_names=["inference", "deploy"],
)
GRID_META = "misalignment_grids"  # metadata key of the 1 mm grid and the fixed grid (JSON)


def find_image(folder: Path, stem: str) -> Path:
    """The one image file ``<stem>.<image extension>`` in ``folder``; a clear error when there is none or several."""
    found = [p for p in sorted(folder.glob(f"{stem}.*")) if image_stem(p) == stem]
    if len(found) != 1:
        raise FileNotFoundError(
            f"input folder {folder}: expected one {stem} image ({stem}.nii.gz, .mha, .nrrd ...), "
            f"found {[p.name for p in found]}"
        )
    return found[0]


class PairLoaderOperator(Operator):
    """Read ``fixed.*`` and ``moving.*`` from the app's input folder; emit ``image``: the pair ``[2, z, y, x]`` HU on
    the fixed image's 1 mm LPS grid (the bundle's own reader and checks), the grids in its metadata."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")
        spec.output("moving_name")

    def compute(self, op_input, op_output, context) -> None:
        fixed, moving = (find_image(self.input_folder, stem) for stem in ("fixed", "moving"))
        pair = load_pair(fixed, moving)
        grids = {"grid": pair.grid.as_arrays(), "fixed_grid": pair.fixed_grid.as_arrays()}
        grids_text = json.dumps({k: {n: v.tolist() for n, v in g.items()} for k, g in grids.items()})
        op_output.emit(Image(pair.image, metadata={GRID_META: grids_text}), "image")
        op_output.emit(image_stem(moving), "moving_name")


class MisalignmentBundleOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle inference operator, sending ``pred`` (class probabilities ``[1, 3, z, y, x]``) on as an
    ``Image``: the SDK turns an output of type "probabilities" into a per-voxel list of class names, meant for
    classification networks, not for a probability map."""

    def predict(self, data: Any, *args, **kwargs) -> Any:
        """The bundle's inferer on the TorchScript module itself (the app context wraps a model given with -m in a
        ``TorchScriptModel``, whose module is its ``predictor``)."""
        network = getattr(self._model_network, "predictor", self._model_network)
        return self._inferer(inputs=data, network=network, *args, **kwargs)

    def _send_output(self, value: Any, name: str, metadata: Dict, op_output, context) -> None:
        array = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        op_output.emit(Image(array, metadata=dict(metadata)), name)


class MapWriterOperator(Operator):
    """Write ``<moving stem>_misalignment.nii.gz`` (uint8 0 correct, 1 poor, 2 wrong) and ``_probabilities.nii.gz``
    on the fixed image's grid, 255 (not assessed) outside the predicted region, atomically."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")
        spec.input("moving_name")

    def compute(self, op_input, op_output, context) -> None:
        pred = op_input.receive("pred")
        stem = op_input.receive("moving_name")
        probabilities = np.asarray(pred.asnumpy())
        probabilities = probabilities.reshape(probabilities.shape[-4:])  # [3, z, y, x], without a batch axis
        grids = {k: Grid.from_arrays(v) for k, v in json.loads(pred.metadata()[GRID_META]).items()}
        mask = probabilities.sum(axis=0) > 0
        probs, labels, _ = to_fixed_grid(probabilities, mask, grids["grid"], grids["fixed_grid"])
        for suffix, values in (("probabilities", probs), ("misalignment", labels)):
            path = atomic_write_image(grids["fixed_grid"].image(values), self.output_folder / f"{stem}_{suffix}.nii.gz")
            logging.info("wrote %s", path)


class MisalignmentDeployApp(Application):
    """Fixed + registered moving CT -> correct/poor/wrong misalignment map with the bundle's TorchScript network."""

    def __init__(self, *args, model_path: Optional[Path] = None, **kwargs) -> None:
        self.model_path = model_path
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        model_path = Path(self.model_path or app_context.model_path)
        loader = PairLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(app_context.input_path), name="pair_loader"
        )
        inference = MisalignmentBundleOperator(
            self,
            app_context=app_context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            bundle_path=model_path,
            bundle_config_names=CONFIG_NAMES,
            name="misalignment_bundle",
        )
        writer = MapWriterOperator(self, output_folder=Path(app_context.output_path), name="map_writer")
        self.add_flow(loader, inference, {("image", "image")})
        self.add_flow(inference, writer, {("pred", "pred")})
        self.add_flow(loader, writer, {("moving_name", "moving_name")})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    MisalignmentDeployApp().run()
