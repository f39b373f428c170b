"""Finding resumable state on the outputs volume and telling complete from partial."""
