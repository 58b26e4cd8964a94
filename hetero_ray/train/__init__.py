"""Training: replay data and its tokenization, the frozen target with the additive update, the objective and loop."""
