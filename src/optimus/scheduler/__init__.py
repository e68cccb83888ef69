"""Step planning and KV-page ownership (pure Python, no tensors)."""
