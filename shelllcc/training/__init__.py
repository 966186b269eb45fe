"""Training utilities (parameter-efficient adapters, train-step helpers)."""
