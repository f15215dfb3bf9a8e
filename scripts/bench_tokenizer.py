"""Tokenizer loading benchmark: a Llama 3-sized vocabulary as Meta's tiktoken file and as a
Hugging Face tokenizer.json, each loaded as llama-gen loads it (the JSON's shape and merges checked).

    python scripts/bench_tokenizer.py /tmp/tok-bench

The vocabulary is synthetic (Llama 3's files are not downloaded): the 256 bytes, then 127,744
tokens each joining two earlier ones (up to 10 bytes: 7 on average, as Llama 3's), then Llama 3's 256 special tokens. The
tokenizer.json lists, as transformers' converter does, every split of a token into two tokens.
"""
from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path

import fire

from llama_gen.text.tokenizer import LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS, load_tokenizer
from llama_gen.text.tokenizer_json import _bytes_to_unicode


def synthetic_ranks(n_ranks: int, max_len: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    tokens = [bytes([b]) for b in range(256)]
    known = set(tokens)
    while len(tokens) < n_ranks:
        joined = rng.choice(tokens[-20000:]) + rng.choice(tokens[:2000])
        if joined not in known and len(joined) <= max_len:
            tokens.append(joined)
            known.add(joined)
    return tokens


def tokenizer_json(tokens: list[bytes]) -> dict[str, object]:
    show = _bytes_to_unicode()
    text = ["".join(show[b] for b in t) for t in tokens]
    rank = {t: r for r, t in enumerate(tokens)}
    merges = sorted((r, rank[t[:i]], rank[t[i:]]) for r, t in enumerate(tokens)
                    for i in range(1, len(t)) if t[:i] in rank and t[i:] in rank)
    added = [{"id": len(tokens) + i, "content": s, "special": True}
             for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)]
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_PAT_STR}, "behavior": "Isolated",
             "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    return {"version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "ignore_merges": True, "byte_fallback": False,
                      "vocab": {s: r for r, s in enumerate(text)},
                      "merges": [[text[a], text[b]] for _, a, b in merges]}}


def main(out_dir: str, n_ranks: int = 128_000, max_len: int = 10, repeats: int = 3) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = synthetic_ranks(n_ranks, max_len)
    rank_file = out / "tokenizer.model"
    rank_file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                 for r, t in enumerate(tokens)))
    doc = tokenizer_json(tokens)
    json_file = out / "tokenizer.json"
    json_file.write_text(json.dumps(doc, ensure_ascii=False))
    mean = sum(map(len, tokens)) / len(tokens)
    print(f"{n_ranks} ranks of {mean:.1f} bytes on average, "
          f"{len(doc['model']['merges'])} merges; "  # type: ignore[index]
          f"tokenizer.json {json_file.stat().st_size / 1e6:.1f} MB")
    for path in (rank_file, json_file):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tok = load_tokenizer(path)
            times.append(time.perf_counter() - start)
        print(f"{path.name}: load {min(times):.2f} s (best of {repeats}), n_words {tok.n_words}")


if __name__ == "__main__":
    fire.Fire(main)
