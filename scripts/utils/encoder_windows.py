"""Where the three encoders read for a 1 mm output block: the window of every level (plain integer geometry).

Shared by the network's tiling (scripts.networks) and the training patches (scripts.data), which must cut the same
windows: a 1 mm output block of ``1 + 8k`` voxels centred on a multiple of 4 is a sample grid of every level.
"""

from typing import Dict, Tuple

from scripts.utils.constants import LATENT_SIZE

TILE_ALIGN = 8  # 1 mm output blocks are 1 + 8k voxels so that their centre is a sample of every level


def level_window(center: int, latent_size: int, factor: int) -> Tuple[int, int]:
    """Encoder input window ``(start, size)`` in level-``factor`` samples for a 1 mm latent tile.

    The tile has ``latent_size`` (``1 + 8k``) 1 mm voxels centred on 1 mm voxel ``center`` (a multiple of 4). The
    window is centred on the same point, holds the encoder's 38-sample context (ENCODER_CONTEXT) and is ``101 + 4j``
    long (PATCH_SIZE + 4j). Literals, not the constants: TorchScript compiles this inside the network's tiling.

    Args:
        center: 1 mm voxel index of the tile centre (a multiple of 4).
        latent_size: tile size on the 1 mm grid (``1 + 8k``), voxels.
        factor: level (4, 2 or 1).

    Returns:
        Tuple ``(start, size)`` in level samples.
    """
    m = (latent_size - 1) // factor + 1
    extra = 0 if m % 4 == 1 else 1
    while m + 76 + 2 * extra < 101:
        extra += 2
    half = (m - 1) // 2 + 38 + extra
    return center // factor - half, 2 * half + 1


def check_output_size(output_size: int) -> int:
    """``output_size`` if it is a valid 1 mm output block edge (``1 + 8k``, at least 25), else ValueError."""
    if int(output_size) != output_size or output_size < LATENT_SIZE or (output_size - 1) % TILE_ALIGN:
        raise ValueError(f"output block edge {output_size} must be 1 + {TILE_ALIGN}k voxels and at least {LATENT_SIZE}")
    return int(output_size)


def window_sizes(output_size: int = LATENT_SIZE, factors=(4, 2, 1)) -> Dict[int, int]:
    """``{factor: encoder input edge}`` for a 1 mm output block of ``output_size`` voxels (101 each for 25).

    Args:
        output_size: 1 mm output block edge (``1 + 8k``, at least 25), voxels.
        factors: levels (4, 2, 1).

    Returns:
        Dict factor -> encoder input edge, samples.

    Raises:
        ValueError: for an invalid ``output_size``.
    """
    check_output_size(output_size)
    return {f: level_window(0, output_size, f)[1] for f in factors}
