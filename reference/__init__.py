"""moela.reference."""
