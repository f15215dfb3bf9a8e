"""The engine: scheduling and running sequences on a model (generation, scoring, the static
baseline), sampling and the KV cache's blocks.
"""
