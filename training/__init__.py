"""Dataset building, fine-tuning, evaluation and tiny offline models for tests and benchmarks."""
