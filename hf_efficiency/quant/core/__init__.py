"""Pure tensor math every method shares: group-wise scheme (ranges, clip search, rounding, packing into
`QuantizedWeight`), bit packing, outlier keeping, mixed-precision allocation, int8 activation math and
re-quantization of merged weights. Imports nothing of the package but `constants`."""
