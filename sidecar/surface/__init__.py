"""What the sidecar shows: health, the HTTP endpoints, metrics, webhooks, incident bundles,
the status report and the live line."""
