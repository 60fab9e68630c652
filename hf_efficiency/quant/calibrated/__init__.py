"""Layer-by-layer calibrated quantization: capture of each decoder layer's inputs (`capture`) and the
pipeline that walks the layers with the selected method of the table (`pipeline`)."""
