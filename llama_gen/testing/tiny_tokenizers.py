"""Tiny but real Llama-style tokenizers, trained in-process in about a second.

Tests and `llama-gen demo` use them instead of Meta's files: a SentencePiece BPE model with
Llama 1/2's settings and a tiktoken rank file in Llama 3's format. Nothing is downloaded.
"""
from __future__ import annotations

import base64
import io
from collections import Counter
from itertools import pairwise
from pathlib import Path

import regex
import sentencepiece as spm

from ..text.tokenizer import LLAMA3_PAT_STR

CORPUS: tuple[str, ...] = (
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a llama who loved to read books.",
    "It walked 12 miles every day and counted 3,141 stars at night.",
    "What is the capital of France? The capital of France is Paris.",
    "Large language models predict the next token from the previous ones.",
    "She said: \"Don't stop now, we're almost there.\"",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * 2)",
    "Prices rose by 4.5% in 2023, and again by 2% in 2024.",
    "Guten Morgen! Wie geht es dir heute?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Ich möchte ein Glas Wasser und zwei Äpfel, bitte.",
    "Die Straße ist lang, und die Bäume sind grün.",
    "Könnten Sie mir bitte den Weg zum Bahnhof zeigen?",
    "Es war einmal ein Lama, das gerne Bücher las.",
    "नमस्ते दुनिया! आप कैसे हैं?",
    "मेरा नाम राम है और मैं दिल्ली में रहता हूँ।",
    "भारत की राजधानी नई दिल्ली है।",
    "आज मौसम बहुत अच्छा है।",
    "मुझे किताबें पढ़ना पसंद है।",
    "एक समय की बात है, एक लामा था जो किताबें पढ़ता था।",
    "こんにちは、世界！元気ですか？",
    "私の名前は田中です。東京に住んでいます。",
    "日本の首都は東京です。",
    "今日はとても良い天気ですね。",
    "本を読むのが好きです。",
    "むかしむかし、本が大好きなラマがいました。",
    "Hello again, world. Hallo Welt. नमस्ते। こんにちは。",
    "  Indented line with trailing spaces   ",
    "Tabs\tand\tnewlines\n\nare whitespace too.",
)


def build_sentencepiece_model(path: str | Path, vocab_size: int = 512) -> Path:
    """Train a SentencePiece BPE model with Llama 1/2's settings and write it to `path`.

    Byte fallback and identity normalization make every string round-trip, as in Llama's.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus is tiny: allow fewer pieces than asked for
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def build_tiktoken_model(path: str | Path, n_merges: int = 256) -> Path:
    """Write a Llama 3 style rank file: the 256 bytes as ranks 0-255, then up to `n_merges` merges.

    The merges come from a plain byte-level BPE over the corpus, split with Llama 3's regex;
    ties go to the smallest pair, so the file is the same for the same arguments.
    """
    pieces = Counter(m.encode() for m in regex.findall(LLAMA3_PAT_STR, "\n".join(CORPUS)))
    words = [[bytes([b]) for b in piece] for piece in pieces]
    counts = list(pieces.values())
    ranks = [bytes([b]) for b in range(256)]
    known = set(ranks)
    for _ in range(n_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in zip(words, counts, strict=True):
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        left, right = min(pairs, key=lambda p: (-pairs[p], p))
        merged = left + right
        if merged not in known:
            ranks.append(merged)
            known.add(merged)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == left and word[i + 1] == right:
                    word[i : i + 2] = [merged]
                i += 1
    path = Path(path)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    return path
