"""Model descriptions, checkpoint loading and architecture detection, and the project's FP model zoo."""
