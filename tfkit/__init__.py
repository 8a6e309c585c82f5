"""tfkit: train, run and explain the Transformer family."""

__version__ = "0.1.0"
