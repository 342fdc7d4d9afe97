"""The bundle's methods by name (configs/inference.json's ``method``): the inferer that predicts and the batch keys
it reads, so that the config wires objects instead of choosing among them."""

from __future__ import annotations

from typing import Dict

from monai.inferers import Inferer

from scripts.inferers.reregistration_inferer import ResidualNetworkInferer

METHODS = ("reregistration", "network", "multiview")  # the default first
PAIR_KEYS = {"mask": "mask", "name": "moving", "region": "region", "spacing": "spacing"}


def reads_residual(method: str, residual_input: str = "none") -> bool:
    """Whether ``method`` re-registers the pair: the re-registration, the multiview estimator, or a residual-informed
    network."""
    return method in ("reregistration", "multiview") or residual_input != "none"


def method_inferer(
    method: str,
    network_inferer: Inferer,
    reregistration_inferer: Inferer,
    residual_input: str = "none",
    multiview_inferer: Inferer | None = None,
) -> Inferer:
    """The inferer of ``method``.

    Args:
        method: one of ``METHODS``.
        network_inferer: the tiled network inferer (``MisalignmentInferer``).
        reregistration_inferer: the re-registration estimator (``ReregistrationInferer``).
        residual_input: the network's residual input ("none": images only; else the network also reads the
            re-registration's residual, so both run).
        multiview_inferer: the multiview estimator (``MultiviewInferer``).

    Returns:
        The re-registration estimator, the multiview estimator, the network inferer, or the network after the
        re-registration (``ResidualNetworkInferer``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "reregistration":
        return reregistration_inferer
    if method == "multiview":
        if multiview_inferer is None:
            raise ValueError("--method multiview needs a multiview inferer")
        return multiview_inferer
    if residual_input == "none":
        return network_inferer
    return ResidualNetworkInferer(reregistration_inferer, network_inferer)


def batch_keys(method: str, residual_input: str = "none") -> Dict[str, str]:
    """The data keys the inferer of ``method`` reads beside the image (``PrepareBatchExtraInput``'s extra_keys):
    the prediction mask always; the region, the grid spacing and the pair's name when it re-registers."""
    return dict(PAIR_KEYS) if reads_residual(method, residual_input) else {"mask": "mask"}
