"""Training: ``state`` (train state, optimizer, EMA) and ``step`` (the pure train step)."""
