"""The batch job: records in, output lines out, exactly once (resume, part files, replicas), and
building the engine from a checkpoint.
"""
