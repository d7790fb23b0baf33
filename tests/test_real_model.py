"""Builds with the embedded SmolLM2-135M-Instruct (fp32, bf16 and 8-bit bitsandbytes on CPU; vLLM)."""

from __future__ import annotations

import pytest

from rlcd_data.config import BuildConfig
from rlcd_data.pipeline import build

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize(("quantization", "dtype"), [("none", "float32"), ("none", "bfloat16"), ("8bit", "auto")])
def test_build_harmless_with_smollm2(quantization, dtype, tmp_path, hh_dir, smollm2_dir):
    import datasets

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
    assert result.stats.pairs + result.stats.examples_dropped == 3
    assert result.stats.pairs >= 1
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
def test_build_harmless_with_smollm2_on_vllm(tmp_path, hh_dir, smollm2_dir):
    """The embedded model on the vLLM backend: pairs pass the same filters, stop strings cut the text."""
    import datasets

    config = BuildConfig(task="harmless", prompts=str(hh_dir / "harmless-base-prompts.jsonl"), limit=4,
                         max_new_tokens=160, backend="vllm", dtype="float32", kv_cache_gib=1.0,
                         output=str(tmp_path / "out"))
    result = build(config, progress=False)
    assert result.stats.pairs + result.stats.examples_dropped == 4 and result.stats.pairs >= 1
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train").to_list()
    for row in rows:
        for side in ("chosen", "rejected"):
            assert row[side].strip() and "Human:" not in row[side] and "\\" not in row[side]
            assert 0 < row[f"{side}_tokens"] <= 160
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "vLLM" in card and "backend: vllm" in (
        tmp_path / "out" / "rlcd_build.yaml").read_text()


def test_gemma_base_model_by_name(tmp_path, hh_dir):
    """`--model gemma-3-270m`: reassembled from its chunk packages, converted once; a base model whose
    tokenizer has no chat template, so `auto` builds in the paper's text format and chat is refused."""
    from rlcd_data.errors import RlcdError

    config = BuildConfig(
        task="harmless", prompts=str(hh_dir / "harmless-base-prompts.jsonl"), limit=2,
        model="gemma-3-270m", backend="transformers", output=str(tmp_path / "out"),
    )
    result = build(config, progress=False)  # most of its outputs run to the token limit: the paper's 300, 5 retries
    assert result.stats.pairs + result.stats.examples_dropped == 2
    assert result.config.prompt_format == "text" and result.config.temperature == 1.0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Gemma 3 270M, base model (Gemma Terms of Use: https://ai.google.dev/gemma/terms)" in card
    assert "Prompt format `text`" in card
    with pytest.raises(RlcdError, match="gemma-3-270m: its tokenizer has no chat template"):
        build(BuildConfig(**{**config.__dict__, "prompt_format": "chat", "output": str(tmp_path / "chat")}),
              progress=False)
