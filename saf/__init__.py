"""saf: store-and-forward hub for clinical imaging and records (the core)."""
