"""llama-gen: dataset generation with Meta-format LLaMA checkpoints."""

__version__ = "0.2.0"
