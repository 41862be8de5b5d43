"""moela.kernels."""
