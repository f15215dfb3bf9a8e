"""Hugging Face tokenizer folders written from the project's tiny tiktoken model, the way Llama 3's
Hugging Face repos were made: transformers' own tiktoken converter (a test dependency only)."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from transformers.convert_slow_tokenizer import TikTokenConverter

from llama_gen.text.tokenizer import LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS


class RankFileConverter(TikTokenConverter):
    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        """Read the rank file itself: tiktoken's loader caches files by their path, in the system's
        temporary folder, so a rewritten file at a reused path would be read stale."""
        lines = Path(tiktoken_url).read_text().split()
        return {base64.b64decode(token): int(rank) for token, rank in zip(lines[::2], lines[1::2])}


def write_tokenizer_json(tiktoken_model_path: str | Path, folder: str | Path) -> Path:
    """Write `folder`/tokenizer.json (byte-level BPE with Llama 3's 256 special tokens after the
    ranks) and a tokenizer_config.json naming bos and eos, as Llama 3's repos have; return the
    tokenizer.json's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    converter = RankFileConverter(vocab_file=str(tiktoken_model_path), pattern=LLAMA3_PAT_STR,
                                 extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS))
    path = folder / "tokenizer.json"
    converter.converted().save(str(path))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def read_json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, ensure_ascii=False))
    return path
