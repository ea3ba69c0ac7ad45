"""One module per CLI command; each builds its pieces and calls the shared pipeline."""
