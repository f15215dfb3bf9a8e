"""Tiny real checkpoints and tokenizers, for the tests and `llama-gen demo` (no downloads)."""
