"""The training engine: one loop for every task. It knows nothing of medicine."""
