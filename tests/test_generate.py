"""The continuously refilled generator with a tiny random Llama."""

from __future__ import annotations

import contextlib

import pytest

from rlcd_data.generate import SamplingSettings, TransformersGenerator, request_seed

# The generator passes its cache under the name the installed transformers expects (``cache`` since the
# rename; ``past_key_values`` stops working in 5.40): the deprecated name fails these tests.
pytestmark = pytest.mark.filterwarnings("error:.*past_key_values.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rlcd_data.models import load_causal_lm

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
    # Batch of 2 with refills: rows join a running batch with other prompts and cache lengths.
    together = TransformersGenerator(model, tokenizer, batch_size=2).generate(PROMPTS, seeds, settings)
    assert alone[0] != alone[1]  # same prompt, own seed
    reversed_ = TransformersGenerator(model, tokenizer, batch_size=4).generate(PROMPTS[::-1], seeds[::-1], settings)
    assert together == alone
    assert reversed_[::-1] == alone
    other_seed = TransformersGenerator(model, tokenizer, batch_size=4).generate(
        PROMPTS, [s + 1 for s in seeds], settings
    )
    assert other_seed != alone


CONTEXT = "\n\nHuman: My neighbour keeps parking in front of my garage and I cannot get my car out. What should I do?"
SHARED = [  # p+/p- style: a long common prefix, then different final tags (and one unrelated prompt)
    CONTEXT + "\n\nAssistant (harmless response):",
    CONTEXT + "\n\nAssistant (harmful response):",
    CONTEXT + "\n\nAssistant (harmful response):",  # a second attempt of the same output
    "\n\nHuman: Count to three.\n\nAssistant:",
]


def test_shared_prefix_is_prefilled_once_and_changes_no_output(tiny, monkeypatch):
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=20)
    seeds = [request_seed("shared", i) for i in range(len(SHARED))]
    alone = [TransformersGenerator(model, tokenizer, batch_size=1).generate([p], [s], settings)[0]
             for p, s in zip(SHARED, seeds)]
    prefilled = []
    original = TransformersGenerator._prefill_prefixes
    monkeypatch.setattr(TransformersGenerator, "_prefill_prefixes",
                        lambda self, todo: prefilled.extend(todo) or original(self, todo))
    for batch_size in (4, 2):  # all admitted at once; or the prefix kept for a later refill
        prefilled.clear()
        assert TransformersGenerator(model, tokenizer, batch_size=batch_size).generate(SHARED, seeds, settings) == alone
        common = tokenizer(CONTEXT + "\n\nAssistant (harm", add_special_tokens=False)["input_ids"]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in SHARED[:2]]
        assert len(prefilled) == 1 and ids[0][: len(prefilled[0])] == ids[1][: len(prefilled[0])] == list(prefilled[0])
        assert len(prefilled[0]) >= len(common) - 2  # the whole common context, up to the descriptor


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

    from rlcd_data.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_model_dir), quantization="none", dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    completions = TransformersGenerator(model, tokenizer, batch_size=2).generate(
        PROMPTS[:3], [1, 2, 3], SamplingSettings(max_new_tokens=10)
    )
    assert len(completions) == 3 and all(1 <= c.num_tokens <= 10 for c in completions)


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_bitsandbytes_quantization_generates_on_cpu(tiny_model_dir, quantization, layer):
    from rlcd_data.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_model_dir), quantization=quantization)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer
    completions = TransformersGenerator(model, tokenizer, batch_size=2).generate(
        PROMPTS[:3], [1, 2, 3], SamplingSettings(max_new_tokens=8)
    )
    assert len(completions) == 3 and all(1 <= c.num_tokens <= 8 for c in completions)


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


def assert_decoding_matches_plain_forward(model, tokenizer, prompts, monkeypatch) -> None:
    """Every next-token distribution the batch samples from (cohorts, shared prefixes, refills, the
    generator's own attention) equals the model's plain forward over the prompt and the tokens so far."""
    import torch

    from rlcd_data.generate.batch import Batch

    seen = []  # (request, tokens so far, logits)
    padded = []  # decoding steps where a cohort held left padding
    sample = Batch.sample

    def spy(self, settings, tok, banned):
        padded.append(any(bool((c.mask == 0).any()) for c in self.cohorts))
        seen.extend((r, tuple(ids), logits.clone()) for r, ids, logits in zip(self.rows, self.generated, self.logits))
        return sample(self, settings, tok, banned)

    monkeypatch.setattr(Batch, "sample", spy)
    TransformersGenerator(model, tokenizer, batch_size=6, refill_at=0.5).generate(
        prompts, [request_seed("plain", i) for i in range(len(prompts))], SamplingSettings(max_new_tokens=12)
    )
    assert {r for r, _, _ in seen} == set(range(len(prompts)))
    assert sum(padded) > 10
    checked = 0
    with torch.inference_mode():
        for r, prompt in enumerate(prompts):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            steps = [(so_far, logits) for i, so_far, logits in seen if i == r]  # recorded step by step
            full = ids + list(steps[-1][0])
            plain = model(input_ids=torch.tensor([full])).logits[0].float()
            for n, (so_far, logits) in enumerate(steps):
                assert list(so_far) == full[len(ids) : len(ids) + n]
                torch.testing.assert_close(logits, plain[len(ids) - 1 + n], atol=5e-5, rtol=1e-5)
                checked += 1
    assert checked == len(seen) > len(prompts) * 5


def test_decoding_logits_equal_the_models_own_forward(tiny, monkeypatch):
    model, tokenizer = tiny
    assert_decoding_matches_plain_forward(model, tokenizer, SHARED + PROMPTS, monkeypatch)


def tiny_config(name: str, tokenizer, **extra):
    import transformers

    return getattr(transformers, name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **extra,
    )


@pytest.mark.parametrize("name", ["Mistral", "Gemma3"])
def test_sliding_window_models_decode_as_their_own_forward(tiny, monkeypatch, name):
    """A sliding window of 8 tokens, much shorter than the prompts: every layer (Mistral) or every
    other layer (Gemma 3) sees only the last 8 tokens, in the batch as in the model's own forward."""
    import torch
    import transformers

    _, tokenizer = tiny
    extra = {"layer_types": ["sliding_attention", "full_attention"]} if name == "Gemma3" else {}
    config_class = f"{name}TextConfig" if name == "Gemma3" else f"{name}Config"
    config = tiny_config(config_class, tokenizer, sliding_window=8, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    generator = TransformersGenerator(model, tokenizer)
    assert generator.window == 8
    # A shared prefix whose rests differ in length: shared prefill states would put padding inside a row.
    uneven = [CONTEXT + "\n\nAssistant (harmless and friendly response):",
              CONTEXT + "\n\nAssistant (harmful and very rude response):"]
    assert_decoding_matches_plain_forward(model, tokenizer, SHARED + PROMPTS + uneven, monkeypatch)


def test_attention_soft_capping_is_refused_in_one_line(tiny):
    import transformers

    from rlcd_data.errors import RlcdError

    _, tokenizer = tiny
    model = transformers.Gemma2ForCausalLM(tiny_config("Gemma2Config", tokenizer, attn_logit_softcapping=50.0))
    with pytest.raises(RlcdError, match="attn_logit_softcapping"):
        TransformersGenerator(model, tokenizer, description="gemma-2")


@pytest.mark.parametrize("max_cohorts", [1, 2, 8])
def test_cohorts_change_no_output(tiny, monkeypatch, max_cohorts):
    """Rows admitted at different refills keep separate caches (cohorts), merged beyond MAX_COHORTS."""
    from rlcd_data.generate import batch

    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=16)
    seeds = [request_seed("cohorts", i) for i in range(len(PROMPTS))]
    alone = [TransformersGenerator(model, tokenizer, batch_size=1).generate([p], [s], settings)[0]
             for p, s in zip(PROMPTS, seeds)]
    seen = []
    forward = batch.Batch.forward
    monkeypatch.setattr(batch.Batch, "forward", lambda self, m: seen.append(len(self.cohorts)) or forward(self, m))
    monkeypatch.setattr(batch, "MAX_COHORTS", max_cohorts)
    generator = TransformersGenerator(model, tokenizer, batch_size=4, refill_at=0.25)
    assert generator.generate(PROMPTS * 2, seeds * 2, settings) == alone * 2
    assert max(seen) == max_cohorts if max_cohorts < 8 else 2 < max(seen) <= 8


def test_a_retry_continues_from_its_finished_rows_prompt_states(tiny, monkeypatch):
    """A retry of a row that just finished prefills only its last prompt token, with the output it gets alone."""
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=10)
    rests = []
    prefill = TransformersGenerator._prefill

    def spy(self, prompts, shared):
        rests.extend(len(x) - (0 if kv is None else kv[0][0].shape[-2]) for x, kv in zip(prompts, shared))
        return prefill(self, prompts, shared)

    monkeypatch.setattr(TransformersGenerator, "_prefill", spy)
    retries = {}

    def on_progress(done, tokens):
        new = [(SHARED[i], request_seed("retry", i)) for i, _ in done if i < 2]
        retries.update({i: seed for i, seed in ((i, request_seed("retry", i)) for i, _ in done if i < 2)})
        return new

    out = TransformersGenerator(model, tokenizer, batch_size=2).generate(SHARED[:2], [1, 2], settings, on_progress)
    assert len(out) == 4 and sorted(retries) == [0, 1]
    assert rests[-2:] == [1, 1] and len(rests) == 5  # shared prefix, two tails, then one token per retry
    order = [i for i in retries]  # the retries take indices 2 and 3 in the order the rows finished
    for index, i in enumerate(order, start=2):
        assert out[index] == TransformersGenerator(model, tokenizer, batch_size=1).generate(
            [SHARED[i]], [retries[i]], settings)[0]


def test_packed_linears_compute_f_linear_and_a_rows_result_does_not_depend_on_its_batch():
    import torch

    from rlcd_data.generate.onednn import packed_forward

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(0)
    layer = torch.nn.Linear(1536, 576)  # a SmolLM2 down projection's shape: oneDNN runs one row differently
    forward = packed_forward(layer.weight.detach(), layer.bias, batch_size=32)
    assert forward is not None
    x = torch.randn(40, 1536)
    torch.testing.assert_close(forward(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    alone = torch.cat([forward(x[i : i + 1]) for i in range(len(x))])
    for m in (2, 3, 7, 32, 40):
        assert torch.equal(forward(x[:m]), alone[:m])
    assert torch.equal(forward(x[None, :1]), alone[None, :1])  # [batch, 1, features], as in decoding


def test_packed_linears_are_restored_and_fall_back_together(tiny, monkeypatch):
    """After a call, even one that raised, every layer runs its own forward again; if one layer
    cannot be packed, none is."""
    import torch

    from rlcd_data.generate import onednn

    model, _ = tiny
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with onednn.packed_linears(model, 4):
        assert all("forward" in vars(m) for m in linears)
    assert not any("forward" in vars(m) for m in linears)
    with pytest.raises(KeyboardInterrupt), onednn.packed_linears(model, 4):
        raise KeyboardInterrupt
    assert not any("forward" in vars(m) for m in linears)
    calls = []
    packed_forward = onednn.packed_forward
    monkeypatch.setattr(onednn, "packed_forward",
                        lambda *a: None if calls.append(1) or len(calls) == 2 else packed_forward(*a))
    with onednn.packed_linears(model, 4):
        assert len(calls) == len(linears)
        assert not any("forward" in vars(m) for m in linears)


def test_packed_linears_stand_in_for_the_weights_they_copy_and_restore_them_exactly():
    """While generating, a packed layer's own weight is freed (the packed copy is the only one), unless
    another layer shares it; afterwards, even after an interrupt, every weight is back bit for bit and
    trainable."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlcd_data.generate import onednn

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    q_proj = model.model.layers[0].self_attn.q_proj
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        expected = model(ids).logits
    for interrupt in (False, True):
        with contextlib.suppress(KeyboardInterrupt), torch.inference_mode(), onednn.packed_linears(model, 4):
            assert q_proj.weight.numel() == 0  # freed: the packed copy stands in for it
            assert model.lm_head.weight.shape == (64, 32)  # tied to the embedding: kept
            torch.testing.assert_close(model(ids).logits, expected)
            if interrupt:
                raise KeyboardInterrupt
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]) and not p.is_inference(), name
    model(ids).logits.sum().backward()
    assert q_proj.weight.grad.shape == q_proj.weight.shape


def test_packed_linears_release_the_checkpoint_file_mapping(tmp_path):
    """from_pretrained maps the safetensors file into memory and the weights point into it: freeing some
    of them frees nothing while the rest keep the mapping alive. While generating, no weight does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlcd_data.generate import onednn

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    checkpoint = str(tmp_path / "model.safetensors")
    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith(checkpoint) for line in maps)

    if not mapped():
        pytest.skip("this platform loads the checkpoint without a file mapping")
    with torch.inference_mode(), onednn.packed_linears(model, 4):
        assert not mapped()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


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

    from rlcd_data.generate.batch import warp

    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0, 0.5]])
    none = torch.tensor([], dtype=torch.long)
    kept = warp(logits.clone(), SamplingSettings(top_k=2), none, [()], [[]]).isfinite()
    assert kept.tolist() == [[True, False, True, False, False]]
    # Repetition penalty on a seen token: positive logits are divided, negative ones multiplied (vLLM's rule).
    warped = warp(logits.clone(), SamplingSettings(repetition_penalty=2.0), none, [(0,)], [[3]])
    assert warped.tolist() == [[1.5, 1.0, 2.0, -2.0, 0.5]]
