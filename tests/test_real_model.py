"""Builds with the embedded SmolLM2-135M-Instruct (fp32, bf16 and 8-bit bitsandbytes on CPU; vLLM) and Gemma 3 270M.

What a real model samples differs from one CPU to the next (their kernels round differently), so these
builds run on `one_token_copy` folders, found by the models' own names: every output ends at its first
visible token. They check loading, conversion, the engine, the format chosen and what the card records,
which hold whatever is sampled; what the models write is the benchmarks' business.
"""

from __future__ import annotations

import pytest

from rlcd_data.pipeline.config import BuildConfig
from rlcd_data.pipeline.run import build

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize(("quantization", "dtype"), [("none", "float32"), ("none", "bfloat16"), ("8bit", "auto")])
def test_build_harmless_with_smollm2(quantization, dtype, tmp_path, hh_dir, one_token_cache, monkeypatch):
    import datasets

    monkeypatch.setenv("RLCD_DATA_CACHE", str(one_token_cache("smollm2-135m-instruct")))

    config = BuildConfig(
        task="harmless",
        prompts=str(hh_dir / "harmless-base-prompts.jsonl"),
        limit=3,
        max_new_tokens=160,
        quantization=quantization,
        dtype=dtype,
        backend="transformers",
        output=str(tmp_path / "out"),
    )
    result = build(config, progress=False)
    assert result.stats.pairs == 3 and result.stats.examples_dropped == 0
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    assert len(rows) == result.stats.pairs
    for row in rows:
        for side in ("chosen", "rejected"):
            assert row[side].strip() and "Human:" not in row[side]
            assert 0 < row[f"{side}_tokens"] <= 160
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and f"quantization `{quantization}`" in card
    assert f"dtype `{'float32' if dtype == 'auto' else dtype}`" in card  # 8-bit on CPU computes in fp32
    if quantization == "8bit":
        assert "bitsandbytes" in card


@pytest.mark.vllm
def test_build_harmless_with_smollm2_on_vllm(tmp_path, hh_dir, one_token_cache, monkeypatch):
    """The embedded model on the vLLM backend, with the end-of-sequence tokens its generation_config.json lists."""
    import datasets

    monkeypatch.setenv("RLCD_DATA_CACHE", str(one_token_cache("smollm2-135m-instruct")))

    config = BuildConfig(task="harmless", prompts=str(hh_dir / "harmless-base-prompts.jsonl"), limit=4,
                         max_new_tokens=160, backend="vllm", dtype="float32", kv_cache_gib=1.0,
                         output=str(tmp_path / "out"))
    result = build(config, progress=False)
    assert result.stats.pairs == 4 and result.stats.examples_dropped == 0
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    for row in rows:
        for side in ("chosen", "rejected"):
            assert row[side].strip() and "Human:" not in row[side] and "\\" not in row[side]
            assert 0 < row[f"{side}_tokens"] <= 160
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "vLLM" in card and "backend: vllm" in (
        tmp_path / "out" / "rlcd_build.yaml").read_text()


def test_gemma_base_model_by_name(tmp_path, hh_dir, one_token_cache, monkeypatch):
    """`--model gemma-3-270m`: reassembled from its chunk packages, converted once; a base model whose
    tokenizer has no chat template, so `auto` builds in the paper's text format and chat is refused."""
    from rlcd_data.errors import RlcdError

    monkeypatch.setenv("RLCD_DATA_CACHE", str(one_token_cache("gemma-3-270m")))

    config = BuildConfig(
        task="harmless", prompts=str(hh_dir / "harmless-base-prompts.jsonl"), limit=2,
        model="gemma-3-270m", backend="transformers", output=str(tmp_path / "out"),
    )
    result = build(config, progress=False)
    assert result.stats.pairs == 2 and result.stats.examples_dropped == 0
    assert result.config.prompt_format == "text" and result.config.temperature == 1.0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Gemma 3 270M, base model (Gemma Terms of Use: https://ai.google.dev/gemma/terms)" in card
    assert "Prompt format `text`" in card
    with pytest.raises(RlcdError, match="gemma-3-270m: its tokenizer has no chat template"):
        build(BuildConfig(**{**config.__dict__, "prompt_format": "chat", "output": str(tmp_path / "chat")}),
              progress=False)
