"""Write a tiny random-weight checkpoint (with its tokenizer) in Meta's layout.

    python scripts/make_tiny_model.py OUT_DIR [--family llama2|llama3] [--n_shards N]
"""
from pathlib import Path

import fire

from llama_gen.testing.tiny import make_tiny_model


def main(out_dir: str, family: str = "llama2", n_shards: int = 1, seed: int = 0) -> None:
    path = make_tiny_model(Path(out_dir), family, n_shards, seed=seed)
    print(f"wrote a tiny {family} checkpoint ({n_shards} shard(s)) to {path}")


if __name__ == "__main__":
    fire.Fire(main)
