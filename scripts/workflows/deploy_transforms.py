"""Dictionary transforms for in-memory pipelines (the MONAI Deploy app): the prediction mask from the pair itself,
where the file-based bundle run gets it from ``LoadMisalignmentPaird``."""

from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.data.image_io import body_mask


class BodyMaskd(MapTransform):
    """Add ``mask_key``: the body mask ``[1, z, y, x]`` (bool) of the fixed channel of ``image [2, z, y, x]`` (HU on
    the 1 mm grid), the region the bundle predicts in (``scripts.data.image_io.body_mask``).

    Args:
        keys: the key of the 2-channel pair (fixed, moving).
        mask_key: where to put the mask.
    """

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "mask") -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        fixed = np.asarray(torch.as_tensor(d[self.keys[0]])[0].detach().cpu().float())
        mask = body_mask(fixed)
        if not mask.any():
            raise ValueError("fixed image: no body found (no tissue above -500 HU); is it a CT in HU?")
        d[self.mask_key] = torch.from_numpy(mask[None])
        return d
