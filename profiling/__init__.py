"""moela.profiling."""
