"""Training data on disk: what collection writes and training reads (one module per format)."""
