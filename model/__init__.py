"""moela.model."""
