"""The paper's network: RegNet encoders, the convolutional LSTM and decoders, MisalignmentNet and the hierarchical
labels of its LSTM steps.

May import: scripts.utils, scripts.transforms."""
