"""The reward PPO optimises, as TRL's PPO calls it: a reward model or an LLM rater (direct RLAIF,
`online.open_reward`) scoring the decoded, cut response; and where the value model starts from."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def reward_adapter_class():
    import torch
    from torch import nn

    from ..generate.engine import end_of_sequence_ids
    from .online import cut_and_score

    class TextReward(nn.Module):
        """A reward (a reward model, or an LLM rater) behind the interface TRL's PPO calls (`get_reward`),
        scoring decoded text.

        TRL calls ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=...)``
        on prompt + response token ids of the *policy's* tokenizer, then
        ``model.score(hidden_states[-1])`` and reads the value at the last
        response token. This module decodes each row, cuts the response at
        the next Human turn (the paper's post-processing), scores prompt +
        response with ``reward`` (its ``score_responses(prompts, responses)``, on its own tokenizer), and
        returns that score at every position; a response that did not end, or is empty, gets ``penalty``.
        A response ends where the policy's ``generate`` stops: at padding, or at an end-of-sequence token of
        its tokenizer or its ``generation_config`` (e.g. ``<|eot_id|>`` beside ``<|end_of_text|>``).
        """

        base_model_prefix = "backbone"

        def __init__(self, reward, policy_tokenizer, prompt_ids: dict[tuple[int, ...], str], penalty: float,
                     policy_generation_config=None):
            super().__init__()
            self.scorer = reward
            # registered, so .to(device) moves it; a rater on a server has no model here
            self.reward = reward.model if reward.model is not None else nn.Identity()
            self.policy_tokenizer = policy_tokenizer
            self.eos_ids = set(end_of_sequence_ids(policy_tokenizer, policy_generation_config))
            self.prompts = prompt_ids
            self.lengths = sorted({len(k) for k in prompt_ids}, reverse=True)
            self.penalty = penalty
            self.config = getattr(reward.model, "config", None)

        def split(self, ids: list[int]) -> tuple[str, list[int]]:
            for n in self.lengths:
                prompt = self.prompts.get(tuple(ids[:n]))
                if prompt is not None:
                    return prompt, ids[n:]
            raise RuntimeError("a rollout does not start with any training prompt")

        def backbone(self, input_ids, attention_mask, **_):
            prompts, texts, ended = [], [], []
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                kept = [t for t, m in zip(ids, mask) if m]
                prompt, response_ids = self.split(kept)
                prompts.append(prompt)
                texts.append(self.policy_tokenizer.decode(response_ids, skip_special_tokens=True))
                ended.append(not mask[-1] or (bool(kept) and kept[-1] in self.eos_ids))
            scores = torch.tensor(cut_and_score(self.scorer, prompts, texts, ended, self.penalty),
                                  device=input_ids.device)
            return _Hidden((scores.unsqueeze(1).expand(input_ids.shape).unsqueeze(-1),))

        def score(self, hidden):
            return hidden

    class _Hidden:
        def __init__(self, hidden_states):
            self.hidden_states = hidden_states

    return TextReward


def value_init(reward_path: str, reward_model, policy_path: str, policy) -> str:
    """The paper initialises the value model from the reward model; that needs the policy's architecture and vocabulary."""
    same = (
        reward_model.model.config.model_type == policy.config.model_type
        and reward_model.model.config.vocab_size == policy.config.vocab_size
        and reward_model.model.config.hidden_size == policy.config.hidden_size
    )
    return str(Path(reward_path)) if same else policy_path
