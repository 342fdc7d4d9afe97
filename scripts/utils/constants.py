"""Conventions shared by every part of the bundle: channel order, intensities, misalignment classes."""

FIXED_CHANNEL = 0  # channel 0 of ``image`` is the fixed image I_F
MOVING_CHANNEL = 1  # channel 1 is the deformed (registered) moving image I_D
CHANNEL_NAMES = ("fixed", "moving")

BACKGROUND_HU = -2048.0  # value outside the body and outside the scan field (docs/method.md section 2)
HU_OFFSET = 1000.0  # network input = (HU + HU_OFFSET) / HU_SCALE, applied inside the network
HU_SCALE = 1000.0

CLASS_NAMES = ("correct", "poor", "wrong")
CLASS_THRESHOLDS_MM = (3.0, 6.0)  # correct [0,3), poor [3,6), wrong [6,inf)
UNASSESSED_LABEL = 255  # misalignment map outside the assessed region (outside the body and lungs or either image)
UNASSESSED_ERROR_MM = -1.0  # error map there: no estimate (NaN would read as 0 mm through ITK's NIfTI reader)

LEVEL_SPACINGS_MM = (4, 2, 1)  # LSTM time steps read the pyramid coarse to fine
PATCH_SIZE = 101  # encoder input edge (voxels) of a training patch at every level
LATENT_SIZE = 25  # encoder output edge for a 101^3 input
ENCODER_CONTEXT = 38  # voxels lost on each side by the encoder's valid convolutions
