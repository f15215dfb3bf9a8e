"""Text: tokenizers, chat formats and stop strings."""
