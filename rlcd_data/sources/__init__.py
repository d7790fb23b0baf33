"""Sources: prompts to simulate from, and preference pairs to train, evaluate or inspect."""
