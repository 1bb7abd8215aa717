"""Dataset readers. For now: the embedded demo set."""
