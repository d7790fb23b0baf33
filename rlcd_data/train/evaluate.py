"""Evaluation: a reward model's agreement with labelled pairs, and a policy against its base.

The preference-model metric of the paper is agreement with human labels: the
fraction of pairs where the reward model scores ``chosen`` above
``rejected`` (ties count as disagreement), reported with the mean probability
the model gives the chosen response, ``sigmoid(r_chosen - r_rejected)``
(the Bradley-Terry probability the reward model was trained to produce).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def agreement(chosen: list[float], rejected: list[float]) -> dict:
    """Accuracy and mean chosen probability from paired scores."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError("need the same, non-zero number of chosen and rejected scores")
    wins = sum(c > r for c, r in zip(chosen, rejected))
    probabilities = [1 / (1 + math.exp(-(c - r))) for c, r in zip(chosen, rejected)]
    return {
        "pairs": len(chosen),
        "accuracy": wins / len(chosen),
        "mean_chosen_probability": sum(probabilities) / len(probabilities),
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(chosen),
    }


def evaluate_reward_model(model, pairs: str, split: str = "train", limit: int | None = None) -> dict:
    """Score every pair of ``pairs`` (see `rlcd_data.pairs.load_pairs`) with ``model`` (a `RewardModel`)."""
    from ..sources.pairs import load_pairs, pair_texts

    table = load_pairs(pairs, split, limit)
    texts = [pair_texts(row, model.tokenizer) for row in table]
    chosen = model.score([c for c, _ in texts])
    rejected = model.score([r for _, r in texts])
    return agreement(chosen, rejected)


def policy_comparison(policy_rewards: list[float], base_rewards: list[float]) -> dict:
    """Mean reward of each side and the policy's win rate by reward (a tie counts one half)."""
    if len(policy_rewards) != len(base_rewards) or not policy_rewards:
        raise ValueError("need the same, non-zero number of policy and base rewards")
    wins = sum(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_rewards, base_rewards))
    return {
        "prompts": len(policy_rewards),
        "policy_mean_reward": statistics.fmean(policy_rewards),
        "base_mean_reward": statistics.fmean(base_rewards),
        "policy_win_rate": wins / len(policy_rewards),
    }


def judge_comparison(labeller, task, prompts: list[str], policy: list[str], base: list[str], chat=None) -> tuple[dict, list[float]]:
    """An LLM judge's pairwise verdict on policy against base responses, position-debiased.

    Each pair is judged with the task's compare.jinja (its first instruction) in both orders, policy
    as A and base as A. A prompt is a win when both orders prefer the policy, a loss when both prefer
    the base, a tie when the orders disagree (the judge's position bias decides); the win rate counts a
    tie one half, with a 95% normal interval over prompts.

    Returns:
        (report, per prompt the probability the policy is better, the two orders averaged)
    """
    n = len(prompts)
    shown = [task.render_comparison(p, 0, a, b, chat) for p, a, b in zip(prompts, policy, base)]
    swapped = [task.render_comparison(p, 0, b, a, chat) for p, a, b in zip(prompts, policy, base)]
    first_is_a = labeller.first_option_probability(shown + swapped)
    outcomes, better = [], []
    for a_policy, a_base in zip(first_is_a[:n], first_is_a[n:]):
        better.append((a_policy + 1 - a_base) / 2)
        if a_policy > 0.5 and a_base < 0.5:
            outcomes.append(1.0)
        elif a_policy < 0.5 and a_base > 0.5:
            outcomes.append(0.0)
        else:
            outcomes.append(0.5)
    rate = statistics.fmean(outcomes)
    half = 1.96 * (statistics.stdev(outcomes) / math.sqrt(n) if n > 1 else 0.0)
    report = {
        "judge_win_rate": rate,
        "judge_win_rate_ci95_low": max(0.0, rate - half),
        "judge_win_rate_ci95_high": min(1.0, rate + half),
        "judge_ties": outcomes.count(0.5) / n,
        "judge_mean_policy_probability": statistics.fmean(better),
    }
    return report, better


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate_policy(
    policy: str,
    reward_model: str | None,
    prompts: str,
    *,
    judge: str | None = None,
    judge_task: str = "harmless",
    judge_quantization: str = "none",
    judge_prompt_format: str = "text",
    judge_server: tuple[str, str | None, str, str] | None = None,
    base: str | None = None,
    prompt_column: str | None = None,
    split: str = "train",
    limit: int | None = 64,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    samples_path: str | Path | None = None,
    penalty_reward: float | None = None,
    backend: str = "auto",
    prompt_format: str = "auto",
) -> dict:
    """Sample one response per prompt from ``policy`` and from its base, and compare their rewards
    (``reward_model``), an LLM judge's verdicts (``judge``, see `judge_comparison`), or both.

    Responses are cut at the next Human turn as in the build. A response that
    does not end within ``max_new_tokens`` (or is empty) is scored as it is,
    unless ``penalty_reward`` is given, which it then gets instead (as in PPO).

    Args:
        base: the model the policy started from; default: the ``base_model``
            recorded by `rlcd-data train ppo` next to the policy.
        backend: the engine that samples: "vllm", "transformers" or "auto"
            (vLLM where installed).
        prompt_format: "text", "chat" or "auto": the format `train ppo` recorded
            for the policy, else chat when its tokenizer has a chat template.
            Both sides are sampled in it; rewards score the text form.
        judge, judge_task, judge_quantization, judge_prompt_format: the judge model, the task whose
            compare.jinja it reads, its bitsandbytes loading, and how it sees the comparison.
        judge_server: (base URL, tokenizer or None, API key variable, API: completions or chat) of a server
            serving ``judge``.

    Returns:
        prompts, mean reward of each side, the policy's win rate by reward,
        mean response length in tokens of each side, and how many responses
        did not end.

    Raises:
        RlcdError: unknown base, missing models or prompts.
    """
    from ..errors import RlcdError
    from ..generate.backends import choose_backend
    from ..generate.engine import SamplingSettings, request_seed
    from ..sources.prompts import load_prompts
    from ..tasks.conversation import as_completion, extract_response
    from .reward_model import RewardModel

    if not reward_model and not judge:
        raise RlcdError("eval policy: give --reward-model, --judge, or both")
    recorded = Path(policy) / "rlcd_recipe.json"
    record = json.loads(recorded.read_text()) if recorded.is_file() else {}
    if base is None:
        if "base_model" not in record:
            raise RlcdError(f"{policy}: no rlcd_recipe.json naming its base model; pass --base")
        base = record["base_model"]
    if prompt_format == "auto":
        prompt_format = record.get("settings", {}).get("prompt_format", "auto")
    prompt_set = load_prompts(prompts, task_input="conversation", column=prompt_column, split=split, limit=limit)
    texts = [p.text for p in prompt_set.prompts]
    seeds = [request_seed(seed, "eval-policy", p.source_index) for p in prompt_set.prompts]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    rewards_of = RewardModel.load(reward_model).score if reward_model else None
    sides = {}
    for side, name in (("policy", policy), ("base", base)):
        engine, _ = choose_backend(backend, "none", name)
        completions, prompt_format = _sample(engine, name, texts, seeds, settings, batch_size, prompt_format)
        responses = [extract_response(c.text, c.ended) for c in completions]
        shown = [r if r is not None else c.text.strip() for r, c in zip(responses, completions)]
        rewards = rewards_of([t + as_completion(t, r) for t, r in zip(texts, shown)]) if rewards_of else [None] * len(texts)
        if penalty_reward is not None and rewards_of:
            rewards = [penalty_reward if r is None else x for r, x in zip(responses, rewards)]
        sides[side] = (completions, responses, rewards, shown)
    report = policy_comparison(sides["policy"][2], sides["base"][2]) if rewards_of else {"prompts": len(texts)}
    better = None
    if judge:
        judged, better = _judge(judge, judge_task, judge_quantization, judge_prompt_format, batch_size, texts,
                                sides["policy"][3], sides["base"][3], judge_server)
        report.update(judged, judge=judge)
    for side, (completions, responses, _, _) in sides.items():
        report[f"{side}_mean_tokens"] = statistics.fmean(c.num_tokens for c in completions)
        report[f"{side}_not_ended"] = sum(r is None for r in responses)
    if samples_path:
        rows = []
        for i, p in enumerate(prompt_set.prompts):
            row = {"source_index": p.source_index, "prompt": p.text}
            for side, (completions, responses, rewards, _) in sides.items():
                row[side] = responses[i] if responses[i] is not None else completions[i].text
                row[f"{side}_ended"] = responses[i] is not None
                if rewards_of:
                    row[f"{side}_reward"] = rewards[i]
            if better is not None:
                row["judge_policy_probability"] = better[i]
            rows.append(row)
        write_jsonl(samples_path, rows)
    report["base"] = base
    report["backend"] = engine
    report["prompt_format"] = prompt_format
    return report


def _judge(judge: str, task_name: str, quantization: str, prompt_format: str, batch_size: int, prompts: list[str],
           policy: list[str], base: list[str], server: tuple | None = None) -> tuple[dict, list[float]]:
    """`judge_comparison` with the judge model loaded (and released) here, or on its server."""
    from ..errors import RlcdError
    from ..generate.labeller import TransformersLabeller
    from ..generate.models import load_causal_lm, resolve_dtype
    from ..tasks.catalog import load_task
    from ..tasks.chat import ChatRenderer, MessagesRenderer, resolve_format

    task = load_task(task_name)
    if not task.has_scorer:
        raise RlcdError(f"eval policy: task {task.name!r} has no compare.jinja for the judge; pick another --judge-task")
    if server:
        from ..generate.backends import open_served
        from ..generate.openai_engine import OpenAILabeller
        from ..generate.server import public_url

        url, tokenizer_name, api_key_env, api = server
        connection, tokenizer = open_served(judge, url, tokenizer_name, api_key_env, api=api)
        labeller = OpenAILabeller(connection, tokenizer)
    else:
        model, tokenizer, _ = load_causal_lm(judge, quantization, resolve_dtype("auto", quantization))
        labeller = TransformersLabeller(model, tokenizer, batch_size)
    if server and server[3] == "chat":  # the server applies the judge's template to the messages
        chat = MessagesRenderer(judge)
    else:
        chat = ChatRenderer(tokenizer, judge) if resolve_format(prompt_format, True, tokenizer, "judge", judge) == "chat" \
            else None
    report, better = judge_comparison(labeller, task, prompts, policy, base, chat)
    if server:
        report.update(judge_server=public_url(server[0]), judge_server_api=server[3],
                      judge_missing_labels=labeller.missing_labels)
        connection.close()
    return report, better


def _sample(engine: str, model: str, texts: list[str], seeds: list[int], settings, batch_size: int,
            prompt_format: str = "text", dtype: str = "auto"):
    """One completion per text from ``model`` on ``engine``, the texts rendered in ``prompt_format`` with the
    model's tokenizer; the model is released afterwards.

    Returns:
        (completions, the resolved format)
    """
    from ..tasks.chat import policy_prompts

    if engine == "vllm":
        from ..generate.models import resolve_model
        from ..generate.vllm_engine import VLLMEngine, VLLMGenerator

        engine_ = VLLMEngine(resolve_model(model).path, dtype=dtype, max_num_seqs=batch_size)
        generator = VLLMGenerator(engine_, model)
        try:
            prompts, resolved = policy_prompts(texts, generator.tokenizer, prompt_format, model)
            return generator.generate(prompts, seeds, settings), resolved
        finally:
            generator.close()
    from ..generate.models import load_causal_lm
    from ..generate.transformers_engine import TransformersGenerator

    loaded, tokenizer, _ = load_causal_lm(model, quantization="none")
    prompts, resolved = policy_prompts(texts, tokenizer, prompt_format, model)
    return TransformersGenerator(loaded, tokenizer, batch_size=batch_size).generate(prompts, seeds, settings), resolved
