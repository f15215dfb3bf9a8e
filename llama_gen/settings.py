"""Every setting of a run, defined once: its type, default, bounds and help text.

The command line (`flags.py`), `--help`, the per-record overrides (`records.py`) and the resume
check (`resume.py`) all read them from `Settings`' fields.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import UserError
from .values import BadValue, Rule

# Fields every output line has, beside the record's own and the completion (--completion_key).
# context_limit is written only where true: the end of the context (--max_seq_len) cut the
# completion short of its max_gen_len.
OUTPUT_FIELDS = ("id", "sample", "finish_reason", "context_limit", "stop_reason",
                 "prompt_tokens", "completion_tokens", "logprobs", "token_ids", "top_logprobs")

# How a setting relates to a finished output line.
DEFINES_OUTPUT = "defines the output"  # a resume must keep it: it changes what a line holds
RUNTIME = "runtime"  # may change on resume (memory, speed, where logs go)


def setting(default: Any = dataclasses.MISSING, *, help: str, role: str = RUNTIME,
            per_record: bool = False, low: float | None = None, high: float | None = None,
            low_open: bool = False, auto: bool = False) -> Any:
    """A `Settings` field. `per_record`: a prompt record may override it. `auto`: the word
    auto is its value None (the run chooses)."""
    return field(default=default, metadata={
        "help": help, "role": role, "per_record": per_record, "auto": auto,
        "bounds": {"low": low, "high": high, "low_open": low_open}})


AUTO = "auto"


@dataclass(frozen=True)
class AutoRule(Rule):
    """An optional setting's rule that also takes the word auto, as None."""

    def check(self, value: Any, from_words: bool = False) -> Any:
        return None if value == AUTO else super().check(value, from_words)

    def describe(self) -> str:
        return f"{super().describe()} or {AUTO}"


@functools.cache
def rules(cls: type) -> dict[str, Rule]:
    """Each `setting` field's rule: its type and bounds."""
    kinds = typing.get_type_hints(cls)
    return {f.name: (AutoRule if f.metadata.get("auto") else Rule)(
        kinds[f.name], **f.metadata["bounds"]) for f in dataclasses.fields(cls)}


def checked(name: str, rule: Rule, value: Any) -> Any:
    """`value` in its setting's type, or a UserError naming the flag."""
    try:
        return rule.check(value)
    except BadValue as e:
        raise UserError(f"--{name} {e}") from None


@functools.cache
def names_with(cls: type, key: str, value: Any) -> tuple[str, ...]:
    """The fields of a settings dataclass whose `setting` metadata has key = value."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata[key] == value)


def check_fields(obj: Any) -> None:
    """Check a settings dataclass's values against their rules and store them in their types
    (a str given for a Path becomes a Path)."""
    for name, rule in rules(type(obj)).items():
        object.__setattr__(obj, name, checked(name, rule, getattr(obj, name)))


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """What every command over a prompt file shares: the model, the files, how records are
    read, and where it runs."""

    # Whether each sequence keeps a KV slot of a full --max_seq_len (scoring), rather than the
    # blocks of a paged cache its tokens fill (generation).
    full_length_slots: ClassVar[bool] = False

    ckpt_dir: Path = setting(help="directory with params.json and consolidated.NN.pth shards, "
                             "or a Hugging Face Llama folder (config.json, *.safetensors)")
    prompt_path: Path = setting(help="JSONL file, one object per line with a prompt (or a "
                                "dialog's messages)")
    out_path: Path = setting(help="JSONL output, appended to and resumed from")
    logging_path: Path | None = setting(None, help="progress log for people "
                                        "(default <out_path>.log)")
    tokenizer_path: Path | None = setting(None, help="tokenizer.model (default: in ckpt_dir "
                                          "or its parent)")
    rope_scaling_factor: float | None = setting(
        None, low=1, help="RoPE's long-context scaling factor, for a checkpoint that scales RoPE "
        "(params.json's use_scaled_rope, config.json's llama3 rope_scaling; default: the file's, "
        "else the release's: 32 for Llama 3.2 1B and 3B, 8 for the other Llama 3.1-style ones)")
    max_seq_len: int | None = setting(
        None, low=1, help="longest prompt + completion in tokens (default: the model's context, "
        "2048 for Llama 1, 4096 for Llama 2, 8192 for Llama 3, 131072 for Llama 3.1 and 3.2, "
        "shortened "
        "to what fits in memory); raise it on resume to answer prompts that were too long")
    max_batch_size: int | None = setting(
        None, low=1, auto=True, help="most sequences decoded at once (vLLM's max_num_seqs), or "
        "auto (the default): on a GPU as many as the KV cache holds at 512 tokens each (up to "
        "256), on the CPU 8. On a GPU the KV cache takes the memory the model leaves either way")
    gpu_memory_utilization: float = setting(
        0.9, low=0, low_open=True, high=1, help="share of each GPU's memory the run may use: "
        "the KV cache takes what the weights and working memory leave of it")
    dtype: Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] | None = setting(
        None, help="weights and activations (default bf16 on GPUs that have it, fp16 on other "
        "GPUs, fp32 on the CPU)")
    quantize: Literal["int8"] | None = setting(None, role=DEFINES_OUTPUT, help="int8: the "
        "blocks' linear weights in int8, a scale per row: half of bf16's memory (see README)")
    quantize_head: bool = setting(False, role=DEFINES_OUTPUT, help="with --quantize, the head too")
    prompt_key: str = setting("prompt", role=DEFINES_OUTPUT, help="the field holding the prompt")
    id_key: str | None = setting(None, role=DEFINES_OUTPUT, help="the field holding a record's "
                                 "id (default: id if present, else the line number)")
    logprobs: bool = setting(False, role=DEFINES_OUTPUT,
                             help="write each token's id and log-probability")
    chat_format: Literal["llama2", "llama3", "template"] | None = setting(
        None, role=DEFINES_OUTPUT, help="Meta's llama2 or llama3, or the folder's chat template "
        "(default: the template where it is not Meta's, else the tokenizer's; Llama 1 has none)")
    system: str | None = setting(None, role=DEFINES_OUTPUT, per_record=True,
                                 help="system message for chat prompts")
    strict: bool = setting(False, help="stop at the first bad input line instead of recording "
                           "it and going on")
    overwrite: bool = setting(False, help="start over: the old output and its files are moved "
                              "aside under a dated name")
    lock: bool = setting(True, help="lock --out_path against a second job (false: where the "
                         "filesystem has no flock, as Lustre mounted without it; then make sure "
                         "no other job writes the same --out_path)")
    model_parallel_size: int | None = setting(None, low=1, help="processes per model copy "
                                              "(default: the shard count when it divides the "
                                              "number of processes, else all of them)")
    device: str | None = setting(None, help="cpu, cuda or cuda:N (default: this process's GPU "
                                 "if any, else cpu)")
    replica_timeout: float = setting(120.0, low=0, low_open=True, help="seconds a replica may "
                                     "give no sign of life before the others count it lost "
                                     "(several replicas): the run then ends without its "
                                     "unwritten samples, for the next run to make")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.quantize_head and not self.quantize:
            raise UserError("--quantize_head quantizes the head beside the blocks: add --quantize")

    def with_overrides(self, overrides: dict[str, Any]) -> JobSettings:
        """These settings with a record's own values in place, each checked by its rule (only
        those: the job calls this per record, up to three passes over the prompt file)."""
        if not overrides:
            return self
        own = copy.copy(self)
        for name, value in overrides.items():
            rule = rules(type(self))[name]  # PER_RECORD, or a batch request's settings
            object.__setattr__(own, name, checked(name, rule, value))
        return own

    @property
    def errors_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".errors.jsonl")

    @property
    def settings_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".run.json")

    @property
    def prompt_lines_path(self) -> Path:
        """A digest of each prompt line the run settings file was taken of (`resume.py`)."""
        return self.out_path.with_name(self.out_path.name + ".run.lines")

    @property
    def lock_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".lock")

    @property
    def log_path(self) -> Path:
        return self.logging_path or self.out_path.with_name(self.out_path.name + ".log")

    def output_defining(self) -> dict[str, Any]:
        """The settings a finished line depends on, as JSON values."""
        return {name: list(value) if isinstance(value := getattr(self, name), tuple) else value
                for name in names_with(type(self), "role", DEFINES_OUTPUT)}

    @property
    def wants_chat(self) -> bool:
        """Whether the flags ask for a chat format (records with messages always need one)."""
        return self.chat_format is not None

    @property
    def chats_every_prompt(self) -> bool:
        """Whether plain prompts too are put in the chat format (generation's --chat)."""
        return False

    @classmethod
    def per_record(cls) -> tuple[str, ...]:
        """The settings a prompt record may set for itself."""
        return names_with(cls, "per_record", True)

    def check_paths(self) -> None:
        """Path errors, before any model loads."""
        if not self.ckpt_dir.is_dir():
            raise UserError(f"--ckpt_dir {self.ckpt_dir}: no such directory (it holds params.json "
                            "and consolidated.NN.pth, or config.json and *.safetensors)")
        if not self.prompt_path.is_file():
            what = "a directory, not a file" if self.prompt_path.is_dir() else "no such file"
            raise UserError(f"--prompt_path {self.prompt_path}: {what}")
        for name, path in (("--out_path", self.out_path), ("--logging_path", self.log_path)):
            if not path.parent.is_dir():
                raise UserError(f"{name} {path}: directory {path.parent} does not exist")
            if path.is_dir():
                raise UserError(f"{name} {path} is a directory: name a file in it")
        # Every file the job writes must be its own: none may be the prompt file or another.
        written = {"--out_path": self.out_path, "the errors file": self.errors_path,
                   "the run settings": self.settings_path, "the lock": self.lock_path,
                   "--logging_path": self.log_path}
        seen = {self.prompt_path.resolve(): "the prompt file"}
        for name, path in written.items():
            if (other := seen.setdefault(path.resolve(), name)) != name:
                raise UserError(f"{name} must not be {other} ({path}): write it elsewhere")


def settings_part(cls: type, *names: str) -> type:
    """A frozen settings dataclass of `cls`'s fields `names`, each as `cls` defines it (type,
    default, bounds and help): the base of a command that takes some of a run's settings, as
    `llama-gen plan` does, so that each is still defined once."""
    kinds, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    part = dataclasses.make_dataclass(
        f"{cls.__name__}Part", [(name, kinds[name], field(default=fields[name].default,
                                                          metadata=fields[name].metadata))
                                for name in names], frozen=True, kw_only=True)
    part.__module__ = __name__
    return part


@dataclass(frozen=True, kw_only=True)
class Settings(JobSettings):
    """A run of `llama-gen`: what to generate from what, and how."""

    command: ClassVar[str] = "generate"
    written_fields: ClassVar[tuple[str, ...]] = OUTPUT_FIELDS

    max_gen_len: int = setting(256, low=1, role=DEFINES_OUTPUT, per_record=True,
                               help="most tokens generated per sample")
    temperature: float = setting(0.6, low=0, high=1e4, role=DEFINES_OUTPUT, per_record=True,
                                 help="sampling temperature, 0 = greedy")
    top_p: float = setting(0.9, low=0, low_open=True, high=1, role=DEFINES_OUTPUT,
                           per_record=True, help="nucleus sampling mass")
    top_k: int = setting(0, low=0, high=2**31 - 1, role=DEFINES_OUTPUT, per_record=True,
                         help="sample among the k most likely tokens only, 0 = all")
    min_p: float = setting(0.0, low=0, high=1, role=DEFINES_OUTPUT, per_record=True,
                           help="drop tokens less likely than min_p times the most likely one")
    repetition_penalty: float = setting(
        1.0, low=0, low_open=True, high=1e4, role=DEFINES_OUTPUT, per_record=True,
        help="divide (multiply if negative) the logits of tokens already in the prompt or the "
        "completion by this, 1 = off (Hugging Face's)")
    presence_penalty: float = setting(
        0.0, low=-2, high=2, role=DEFINES_OUTPUT, per_record=True,
        help="subtract this from the logits of tokens already generated, 0 = off (OpenAI's)")
    frequency_penalty: float = setting(
        0.0, low=-2, high=2, role=DEFINES_OUTPUT, per_record=True,
        help="subtract this times its count from each generated token's logit, 0 = off "
        "(OpenAI's)")
    stop: tuple[str, ...] = setting(
        (), role=DEFINES_OUTPUT, per_record=True,
        help="stop strings: the completion ends before the first one it contains")
    min_tokens: int = setting(0, low=0, role=DEFINES_OUTPUT, per_record=True,
                              help="generate at least this many tokens before any stop")
    ignore_eos: bool = setting(False, role=DEFINES_OUTPUT, per_record=True,
                               help="do not stop at end-of-text or end-of-turn tokens (they are "
                               "kept); only max_gen_len and stop strings end a completion")
    seed: int = setting(0, role=DEFINES_OUTPUT, per_record=True,
                        help="base seed; each (record, sample) draws from its own stream")
    num_samples: int = setting(1, low=1, high=1024, role=DEFINES_OUTPUT, per_record=True,
                               help="completions per prompt")
    completion_key: str = setting("completion", role=DEFINES_OUTPUT, help="the output field "
                                  "holding the completion")
    top_logprobs: int = setting(0, low=0, high=20, role=DEFINES_OUTPUT,
                                help="write each generated token's most likely alternatives, "
                                "this many")
    keep_special_tokens: bool = setting(False, role=DEFINES_OUTPUT,
                                        help="keep special tokens' text in the completion")
    chat: bool = setting(False, role=DEFINES_OUTPUT, help="wrap each prompt as a user message "
                         "in the model's chat format (records with messages always are)")
    echo: bool = setting(False, role=DEFINES_OUTPUT, help="include the prompt in the completion")
    scheduler: Literal["continuous", "static"] = setting(
        "continuous", help="continuous (a finished sequence's slot takes the next prompt at "
        "once) or static (Meta's reference batching, for comparison)")
    compile: bool | None = setting(
        None, auto=True, help="compile the decode step with torch.compile, at a few batch sizes "
        "padded to, replayed as CUDA graphs on GPUs (compiled and recorded at start-up), or "
        "auto (the default): on GPUs for the continuous scheduler, off on the CPU (where it is "
        "not faster) and for --scheduler static; false runs every step eagerly, as vLLM's "
        "--enforce-eager")
    kv_cache_tokens: int | None = setting(
        None, low=1, auto=True, help="advanced: positions the KV cache holds across all "
        "sequences, or auto (the default): on a GPU what fits beside the model (see "
        "--gpu_memory_utilization), on the CPU a full --max_seq_len per sequence; at least one "
        "sequence of --max_seq_len in whole blocks. Fewer than the sequences need makes them "
        "wait for blocks or be preempted and generated again")
    kv_block_size: int | None = setting(
        None, low=1, auto=True, help="advanced: positions per KV cache block, at most "
        "--max_seq_len (as vLLM's --block-size), or auto (the default): 128 on GPUs (a multiple "
        "of 16 there), on the CPU one block of --max_seq_len per sequence (an unpaged cache); a "
        "sequence holds the blocks its tokens fill")

    @property
    def wants_chat(self) -> bool:
        return self.chat or self.chat_format is not None

    @property
    def chats_every_prompt(self) -> bool:
        return self.chat

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.completion_key in OUTPUT_FIELDS:
            raise UserError(f"--completion_key {self.completion_key} is another output field "
                            f"(llama-gen writes {', '.join(OUTPUT_FIELDS)}): choose another name")
        if self.top_logprobs and not self.logprobs:  # OpenAI's rule too
            raise UserError(f"--top_logprobs {self.top_logprobs} lists each token's alternatives "
                            "beside its own logprob: add --logprobs")
        if self.compile is True and self.scheduler == "static":
            raise UserError("--compile compiles the continuous scheduler's decode step; the "
                            "static one is the uncompiled baseline: drop one of the two")
        if self.kv_block_size is not None and self.scheduler == "static":
            raise UserError("--kv_block_size pages the continuous scheduler's KV cache; the "
                            "static one keeps a full --max_seq_len per sequence: drop one of "
                            "the two")
        if self.max_seq_len is not None:  # known once a run resolves it, or given
            self.check_kv_cache(self.kv_block_size or self.max_seq_len)

    def check_kv_cache(self, block_size: int) -> None:
        """--kv_block_size and --kv_cache_tokens against --max_seq_len, in blocks of
        `block_size` (the one given, or the device's default): a block no longer than a
        sequence, and a cache of whole blocks that holds one sequence of --max_seq_len (a
        sequence longer than the cache could never finish)."""
        if self.kv_block_size is not None and self.kv_block_size > self.max_seq_len:
            raise UserError(f"--kv_block_size {self.kv_block_size} is longer than --max_seq_len "
                            f"{self.max_seq_len}: a block holds positions of one sequence; use "
                            f"at most {self.max_seq_len}")
        tokens = self.kv_cache_tokens
        need = -(-self.max_seq_len // block_size) * block_size
        if tokens is not None and tokens // block_size * block_size < self.max_seq_len:
            blocks = (f" in whole blocks of {block_size} positions" if need > self.max_seq_len
                      else "")
            raise UserError(f"--kv_cache_tokens {tokens} cannot hold one sequence of "
                            f"--max_seq_len {self.max_seq_len}{blocks}: give at least {need}, "
                            "or a shorter --max_seq_len")


# Fields every line of `llama-gen score` has, beside the record's own.
SCORE_FIELDS = ("id", "sample", "logprob", "n_tokens", "mean_logprob", "token_logprobs",
                "token_ids")


@dataclass(frozen=True, kw_only=True)
class ScoreSettings(JobSettings):
    """A run of `llama-gen score`: the log-likelihood of each record's text under the model."""

    command: ClassVar[str] = "score"
    written_fields: ClassVar[tuple[str, ...]] = SCORE_FIELDS
    num_samples: ClassVar[int] = 1  # a text has one score
    full_length_slots: ClassVar[bool] = True  # a full-length, unpaged slot per text
    kv_cache_tokens: ClassVar[None] = None
    kv_block_size: ClassVar[None] = None
    # Generation's flags that mean nothing here, and why: the flag parser says so in one line.
    refused: ClassVar[dict[str, str]] = {
        name: "is generation's: scoring keeps an unpaged KV cache of a full --max_seq_len per "
        "text (--max_batch_size of them); drop it"
        for name in ("kv_cache_tokens", "kv_block_size")}

    prompt_path: Path = setting(help="JSONL file, one record per line: a text, a prompt and "
                                "its completion, or a dialog's messages")
    text_key: str = setting("text", role=DEFINES_OUTPUT, help="the field holding a text scored "
                            "whole (every token after bos)")
    completion_key: str = setting("completion", role=DEFINES_OUTPUT, help="the field holding a "
                                  "completion scored given the record's prompt")

    def __post_init__(self) -> None:
        super().__post_init__()
        keys = {"--prompt_key": self.prompt_key, "--text_key": self.text_key,
                "--completion_key": self.completion_key}
        if len(set(keys.values())) < len(keys):
            raise UserError(f"{', '.join(f'{k} {v}' for k, v in keys.items())}: the three "
                            "fields must differ")


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
RULES = rules(Settings)
PER_RECORD = Settings.per_record()
OUTPUT_DEFINING = names_with(Settings, "role", DEFINES_OUTPUT)
REQUIRED = tuple(name for name, f in FIELDS.items() if f.default is dataclasses.MISSING)
