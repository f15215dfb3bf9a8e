"""The model: its shape, Meta's checkpoints, the model-parallel layers, kernels, and the
transformer with its KV cache.
"""
