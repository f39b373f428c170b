"""One training run on disk: where its files are, its lock and the sidecar's ledger of it."""
