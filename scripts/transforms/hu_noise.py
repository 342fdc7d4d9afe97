"""Training-only dictionary transforms: the integer intensity noise of the authors' TensorFlow RegNet code."""

from typing import Any, Dict, Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type


class RandIntegerHUNoised(RandomizableTransform, MapTransform):
    """Add integer noise ``round(N(mu, sigma))`` to the HU of every voxel, ``mu = round(N(0, mean_sigma))`` per call.

    docs/method.md section 3: the TF code draws ``mu`` once per batch; here once per sample (one call), shared by all
    ``keys`` of the sample (e.g. its 4, 2 and 1 mm patches), with independent per-voxel noise in every channel.
    Works on any array shape (channel-first patches ``[C, D, H, W]``); apply it before any normalisation.
    MONAI's RandGaussianNoised has no random mean and no rounding, hence this transform.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        sigma: float = 2.0,
        mean_sigma: float = 2.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if sigma < 0 or mean_sigma < 0:
            raise ValueError(f"noise sigmas must be >= 0, got sigma={sigma}, mean_sigma={mean_sigma}")
        self.sigma = sigma
        self.mean_sigma = mean_sigma
        self._mean = 0.0

    def randomize(self, data: Any = None) -> None:
        """Decide whether to apply the noise and draw this sample's integer mean."""
        super().randomize(None)
        if self._do_transform:
            self._mean = float(np.round(self.R.normal(0.0, self.mean_sigma)))

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            noise = np.round(self.R.normal(self._mean, self.sigma, size=tuple(image.shape)))
            d[key] = image + convert_to_dst_type(noise, image, dtype=image.dtype)[0]
        return d
