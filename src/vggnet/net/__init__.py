"""The network layer: architectures as data (configs), the VGG module and its registry (models), the dense
conversion, layer taps, the features-only wrapper, the compressed layer types, and the analysis on the meta device.
It knows nothing about files, weight formats, data, devices or training."""
