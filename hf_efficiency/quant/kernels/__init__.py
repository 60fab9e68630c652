"""Device-specific matmul paths of `QuantLinear`: per-call dispatch (`dispatch`), the fused C++ CPU
kernel (`cpu`, sources in ``csrc/``), and the CUDA int8/int4 paths."""
