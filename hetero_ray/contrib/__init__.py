"""Around the core, off its import path: evaluation, expert training, the model zoo, tiny models, the demo."""
