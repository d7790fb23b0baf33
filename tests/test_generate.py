"""The transformers backend (`generate` with seeded per-row sampling and stops) with a tiny random Llama."""

from __future__ import annotations

import pytest
from conftest import with_second_end_of_sequence

from rlcd_data.generate import SamplingSettings, TransformersGenerator, request_seed


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rlcd_data.generate.models import load_causal_lm

    # fp32: the exactness checks compare against the model's own forward at fp32 tolerances
    model, tokenizer, _ = load_causal_lm(str(tiny_model_dir), quantization="none", dtype="float32")
    return model, tokenizer


PROMPTS = [
    "\n\nHuman: Hi\n\nAssistant:",
    "\n\nHuman: Hi\n\nAssistant:",  # the same prompt twice (as retries are): one shared prefill
    "\n\nHuman: A much longer question about gardening, cooking and the weather tomorrow?\n\nAssistant:",
    "\n\nHuman: Why?\n\nAssistant: Because.\n\nHuman: Why not?\n\nAssistant:",
    "\n\nHuman: Tell me a story about a dragon who opens a bakery in a small town.\n\nAssistant:",
    "\n\nHuman: Count to three.\n\nAssistant:",
]


def test_output_depends_on_seed_not_on_batch_or_order(tiny):
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=30)
    seeds = [request_seed("test", i) for i in range(len(PROMPTS))]
    alone = [TransformersGenerator(model, tokenizer, batch_size=1).generate([p], [s], settings)[0]
             for p, s in zip(PROMPTS, seeds)]
    one_by_one = TransformersGenerator(model, tokenizer, batch_size=1).generate(PROMPTS, seeds, settings)
    assert one_by_one == alone
    # Batches of 2 and 4: rows share a batch with other prompts of other lengths (left padding).
    together = TransformersGenerator(model, tokenizer, batch_size=2).generate(PROMPTS, seeds, settings)
    assert alone[0] != alone[1]  # same prompt, own seed
    reversed_ = TransformersGenerator(model, tokenizer, batch_size=4).generate(PROMPTS[::-1], seeds[::-1], settings)
    assert together == alone
    assert reversed_[::-1] == alone
    other_seed = TransformersGenerator(model, tokenizer, batch_size=4).generate(
        PROMPTS, [s + 1 for s in seeds], settings
    )
    assert other_seed != alone


def test_the_tiny_models_chance_to_end_is_what_the_sampling_tests_rely_on(tiny):
    """Tests that sample from the tiny model count on it ending a step with a chance of a few percent, in
    any context: whatever this CPU draws, outputs then end often enough within 24-40 tokens that a build
    with retries drops an example with a chance below 1e-3, and some still run into a limit of 12.
    That chance is a property of the weights (conftest.make_tiny_llama), checked here on its logits."""
    import torch

    model, tokenizer = tiny
    ids = tokenizer("".join(PROMPTS) + " and some more words of a sampled answer" * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        chance = torch.softmax(model(ids).logits[0].float(), dim=-1)[:, tokenizer.eos_token_id]
    assert 0.03 < chance.min() and chance.max() < 0.15, (chance.min(), chance.max())


CONTEXT = "\n\nHuman: My neighbour keeps parking in front of my garage and I cannot get my car out. What should I do?"
SHARED = [  # p+/p- style: a long common prefix, then different final tags (and one unrelated prompt)
    CONTEXT + "\n\nAssistant (harmless response):",
    CONTEXT + "\n\nAssistant (harmful response):",
    CONTEXT + "\n\nAssistant (harmful response):",  # a second attempt of the same output
    "\n\nHuman: Count to three.\n\nAssistant:",
]


def test_sequences_stop_at_eos_or_limit_and_progress_counts_tokens(tiny):
    model, tokenizer = tiny
    seen = []
    # Nothing banned: the re-tokenization bound below holds for this random token stream, not for every one.
    completions = TransformersGenerator(model, tokenizer, batch_size=3).generate(
        PROMPTS[1:] * 4, list(range(20)), SamplingSettings(max_new_tokens=12, banned_characters=""),
        lambda done, tokens: seen.append((done, tokens)),
    )
    assert sorted(i for done, _ in seen for i, _ in done) == list(range(20))
    assert all(completions[i] == c for done, _ in seen for i, c in done)
    assert sum(t for _, t in seen) == sum(c.num_tokens for c in completions)
    assert all(1 <= c.num_tokens <= 12 for c in completions)
    ended = [c for c in completions if c.ended]
    assert ended and len(ended) < 20  # some end at EOS, some run into the limit
    assert all(c.num_tokens == 12 for c in completions if not c.ended and "Human" not in c.text)
    for c in completions:
        assert len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= c.num_tokens + 2


def test_tokens_with_banned_characters_are_never_sampled(tiny):
    from rlcd_data.generate import banned_token_ids

    model, tokenizer = tiny
    banned = banned_token_ids(tokenizer, "ea")
    assert banned and tokenizer.eos_token_id not in banned
    assert all("e" in t or "a" in t for t in tokenizer.batch_decode([[i] for i in banned]))
    generator = TransformersGenerator(model, tokenizer, batch_size=4)
    free = generator.generate(PROMPTS * 2, list(range(12)), SamplingSettings(max_new_tokens=20, banned_characters=""))
    assert any("e" in c.text or "a" in c.text for c in free)  # the random model writes them unless banned
    for c in generator.generate(PROMPTS * 2, list(range(12)), SamplingSettings(max_new_tokens=20, banned_characters="ea")):
        assert "e" not in c.text and "a" not in c.text and c.num_tokens >= 1


def test_stop_string_ends_a_sequence(tiny):
    """Force the tiny model to write "\\nHuman" by making it the only likely continuation."""
    import torch

    model, tokenizer = tiny
    target = tokenizer("\nHuman", add_special_tokens=False)["input_ids"]
    original = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight[:, 0] = 0.0
            for t in target:  # a random mix of "\n" and "Human" tokens soon spells "\nHuman"
                model.lm_head.weight[t, 0] = 5.0
        completion = TransformersGenerator(model, tokenizer, batch_size=2).generate(
            PROMPTS[:1], [1], SamplingSettings(max_new_tokens=50)
        )[0]
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(original)
    assert completion.text.endswith("\nHuman") and not completion.ended and completion.num_tokens < 50


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_other_dtypes_generate(tiny_model_dir, dtype):
    import torch

    from rlcd_data.generate.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_model_dir), quantization="none", dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    completions = TransformersGenerator(model, tokenizer, batch_size=2).generate(
        PROMPTS[:3], [1, 2, 3], SamplingSettings(max_new_tokens=10)
    )
    assert len(completions) == 3 and all(1 <= c.num_tokens <= 10 for c in completions)


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_bitsandbytes_quantization_generates_on_cpu(tiny_model_dir, quantization, layer):
    from rlcd_data.generate.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_model_dir), quantization=quantization)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer
    completions = TransformersGenerator(model, tokenizer, batch_size=2).generate(
        PROMPTS[:3], [1, 2, 3], SamplingSettings(max_new_tokens=8)
    )
    assert len(completions) == 3 and all(1 <= c.num_tokens <= 8 for c in completions)


def test_sampling_defaults_in_generation_config_do_not_change_outputs(tiny, tiny_model_dir, tmp_path):
    """transformers' generate() fills unset settings from generation_config.json; our settings alone count."""
    import json
    import shutil

    from rlcd_data.generate.models import load_causal_lm

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.05, top_k=2, repetition_penalty=5.0, no_repeat_ngram_size=1,
                  min_new_tokens=15, suppress_tokens=[198])
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(config))
    with_defaults, tokenizer, _ = load_causal_lm(str(tmp_path / "m"), quantization="none", dtype="float32")
    assert with_defaults.generation_config.no_repeat_ngram_size == 1
    seeds = [request_seed("defaults", i) for i in range(len(PROMPTS))]
    settings = SamplingSettings(max_new_tokens=20)
    plain = TransformersGenerator(*tiny, batch_size=3).generate(PROMPTS, seeds, settings)
    assert any(c.ended for c in plain) and any(c.num_tokens == 20 for c in plain)
    assert TransformersGenerator(with_defaults, tokenizer, batch_size=3).generate(PROMPTS, seeds, settings) == plain
    assert with_defaults.generation_config.no_repeat_ngram_size == 1  # the model's own config is left as it was


def test_an_end_of_sequence_token_listed_in_generation_config_ends_outputs(tiny_model_dir, tmp_path):
    from rlcd_data.generate.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(with_second_end_of_sequence(tiny_model_dir, tmp_path / "m")),
                                         quantization="none", dtype="float32")
    completions = TransformersGenerator(model, tokenizer, batch_size=2).generate(
        PROMPTS[:4], [1, 2, 3, 4], SamplingSettings(max_new_tokens=20)
    )
    assert [(c.text, c.num_tokens, c.ended) for c in completions] == [("", 1, True)] * 4


def test_requests_added_during_a_call_run_in_it(tiny):
    """What the progress callback returns (a retry) joins the call; its output is the one it gets alone."""
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=10)
    extra = (SHARED[1], request_seed("extra"))
    added = []

    def on_progress(done, tokens):
        if done and not added:
            added.append(done[0][0])
            return [extra]
        return None

    out = TransformersGenerator(model, tokenizer, batch_size=2).generate(SHARED[:2], [1, 2], settings, on_progress)
    alone = TransformersGenerator(model, tokenizer, batch_size=1).generate([extra[0]], [extra[1]], settings)
    assert len(out) == 3 and out[2] == alone[0]


def assert_decoding_matches_plain_forward(model, tokenizer, prompts, monkeypatch, expect_grouped: bool = True) -> None:
    """Every next-token distribution the sampler sees (left-padded rows of different lengths in one
    batch) equals the model's plain forward over that row's prompt and its tokens so far."""
    import torch

    from rlcd_data.generate import transformers_engine
    from rlcd_data.generate.transformers_engine import SeededSampler

    seen = []  # (prompt, tokens so far, logits)
    call = SeededSampler.__call__
    from transformers.integrations import sdpa_attention

    calls = {"ours": 0, "passed on": 0}  # attention calls, and those our function passed to transformers' own
    ours, theirs = transformers_engine.sdpa_grouped_kv, sdpa_attention.sdpa_attention_forward

    def count(key, function):
        return lambda *args, **kwargs: (calls.__setitem__(key, calls[key] + 1), function(*args, **kwargs))[1]

    monkeypatch.setattr(transformers_engine, "sdpa_grouped_kv", count("ours", ours))
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", count("passed on", theirs))
    implementation = model.config._attn_implementation

    def spy(self, input_ids, scores):
        width = max(self.prompt_lengths)
        seen.extend((tuple(row[width - n : width].tolist()), tuple(row[width:].tolist()), logits.float().clone())
                    for row, n, logits in zip(input_ids, self.prompt_lengths, scores))
        return call(self, input_ids, scores)

    monkeypatch.setattr(SeededSampler, "__call__", spy)
    completions = TransformersGenerator(model, tokenizer, batch_size=6).generate(
        prompts, [request_seed("plain", i) for i in range(len(prompts))], SamplingSettings(max_new_tokens=12)
    )
    # On a CPU, sdpa models decode with the grouped heads read in place; the plain forward below runs
    # transformers' own attention again.
    assert (calls["ours"] > calls["passed on"]) == expect_grouped and model.config._attn_implementation == implementation
    encoded = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]): p for p in prompts}
    assert {encoded[ids] for ids, _, _ in seen} == set(prompts)
    assert len({len(ids) for ids, _, _ in seen}) > 2  # rows of different lengths shared batches
    lengths = {p: c.num_tokens for p, c in zip(prompts, completions)}
    checked = 0
    with torch.inference_mode():
        for ids, so_far, logits in seen:
            if len(so_far) >= lengths[encoded[ids]]:
                continue  # the row had finished: padding, not sampled from
            plain = model(input_ids=torch.tensor([list(ids + so_far)])).logits[0, -1].float()
            torch.testing.assert_close(logits, plain, atol=5e-5, rtol=1e-5)
            checked += 1
    assert checked > len(prompts) * 5


def test_decoding_logits_equal_the_models_own_forward(tiny, monkeypatch):
    model, tokenizer = tiny
    assert model.config._attn_implementation == "sdpa"
    assert_decoding_matches_plain_forward(model, tokenizer, SHARED + PROMPTS[2:], monkeypatch)


def tiny_config(name: str, tokenizer, **extra):
    import transformers

    return getattr(transformers, name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **extra,
    )


@pytest.mark.parametrize("name", ["Mistral", "Gemma3", "Gemma2"])
def test_sliding_window_and_soft_capped_models_decode_as_their_own_forward(tiny, monkeypatch, name):
    """A sliding window of 8 tokens, much shorter than the prompts: every layer (Mistral) or every
    other layer (Gemma 2 and 3) sees only the last 8 tokens, in the batch as in the model's own
    forward; Gemma 2 caps its output logits too."""
    import torch
    import transformers

    _, tokenizer = tiny
    extra = {"layer_types": ["sliding_attention", "full_attention"]} if name.startswith("Gemma") else {}
    if name == "Gemma2":
        extra["attn_logit_softcapping"] = 5.0
    config_class = f"{name}TextConfig" if name == "Gemma3" else f"{name}Config"
    config = tiny_config(config_class, tokenizer, sliding_window=8, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    # Gemma 2's attention soft cap (which transformers' sdpa leaves out) goes to transformers' own attention:
    # sdpa there falls back to it, and transformers 5.25 picks eager attention for it from the start.
    assert model.config._attn_implementation == "sdpa" or name == "Gemma2"
    assert_decoding_matches_plain_forward(model, tokenizer, SHARED + PROMPTS[2:], monkeypatch, name != "Gemma2")


def greedy_reference(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """transformers' own greedy decoding, as text."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                         **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("options, reference", [
    ({"top_k": 1}, {}),
    ({"top_p": 1e-6, "temperature": 2.0}, {}),
    ({"top_k": 1, "repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),  # the prompt's tokens count too
])
def test_sampling_options_reach_transformers_greedy_decoding(tiny, options, reference):
    import copy

    import torch

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():  # greedy decoding of the tiny model would end at once: never end
        model.lm_head.weight[tokenizer.eos_token_id, 0] = -1.0
    settings = SamplingSettings(max_new_tokens=12, banned_characters="", **options)
    generator = TransformersGenerator(model, tokenizer, batch_size=4)
    first = generator.generate(PROMPTS, [request_seed(7, i) for i in range(len(PROMPTS))], settings)
    other_seeds = generator.generate(PROMPTS, [request_seed(8, i) for i in range(len(PROMPTS))], settings)
    assert first == other_seeds  # nothing left to sample from
    for prompt, completion in zip(PROMPTS, first):
        assert completion.num_tokens == 12 and completion.text
        assert completion.text == greedy_reference(model, tokenizer, prompt, 12, **reference)
    if "repetition_penalty" in options:  # and it changes what greedy decoding writes
        plain = generator.generate(PROMPTS, [0] * len(PROMPTS), SamplingSettings(12, banned_characters="", top_k=1))
        assert plain != first


def test_top_k_samples_only_among_the_k_most_likely(tiny):
    import torch

    from rlcd_data.generate.transformers_engine import warp

    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0, 0.5]])
    none = torch.tensor([], dtype=torch.long)
    kept = warp(logits.clone(), SamplingSettings(top_k=2), none).isfinite()
    assert kept.tolist() == [[True, False, True, False, False]]
    # Repetition penalty on a seen token: positive logits are divided, negative ones multiplied (vLLM's rule).
    warped = warp(logits.clone(), SamplingSettings(repetition_penalty=2.0), none, [torch.tensor([0, 3])])
    assert warped.tolist() == [[1.5, 1.0, 2.0, -2.0, 0.5]]
