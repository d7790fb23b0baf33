"""Attention over the batch's cohorts: a cache that hands each layer's attention the cohorts' own
keys/values (a `Ragged`), and the SDPA attention registered with transformers that reads them."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .batch import Part


@functools.cache
def cache_argument(model_class) -> str:
    """The name of the forward's key/value cache argument: ``past_key_values`` until transformers renamed it
    ``cache`` (the old name is accepted with a warning until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class Ragged:
    """Keys/values of a decoding step, per cohort: (first row, end row, keys, values, mask)."""

    def __init__(self, parts: list, window: int | None):
        self.parts = parts
        self.window = window


# Name under which the attention that understands Ragged is registered with transformers.
RAGGED_ATTENTION = "rlcd_ragged_sdpa"


@functools.cache
def ragged_cache_class():
    import torch
    from transformers import DynamicCache

    class RaggedCache(DynamicCache):
        """The batch's cohorts seen as one cache: each layer's update writes every cohort's new token
        in place and hands the attention a Ragged instead of one padded tensor."""

        def __init__(self, cohorts: list[Part], config, window: int | None):
            super().__init__(config=config)
            self.cohorts, self.window = cohorts, window
            # Additive masks, made once per step (SDPA would turn a boolean mask into one in every layer).
            dtype = cohorts[0].layers[0].keys.dtype
            self.masks = [torch.zeros(c.mask.shape, dtype=dtype, device=c.mask.device)
                          .masked_fill_(c.mask == 0, float("-inf"))[:, None, None, :] for c in cohorts]
            # transformers takes a 4-D mask as already prepared; the attention uses self.masks instead.
            self.placeholder_mask = cohorts[0].mask.new_ones(sum(map(len, cohorts)), 1, 1, 1, dtype=bool)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            parts, start = [], 0
            for c, mask in zip(self.cohorts, self.masks):
                end = start + len(c)
                keys, values = c.layers[layer_idx].update(key_states[start:end], value_states[start:end])
                parts.append((start, end, keys, values, mask))
                start = end
            ragged = Ragged(parts, self.window)
            return ragged, ragged

    return RaggedCache


@functools.cache
def register_ragged_attention() -> str:
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if not isinstance(key, Ragged):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        # One new token per row: a key/value head's query heads attend as that many query positions
        # (what transformers' sdpa path does for one token), so keys/values are not repeated per head.
        rows, heads, _, dim = query.shape
        groups = key.parts[0][2].shape[1]
        query = query.reshape(rows, groups, heads // groups, dim)
        # A sliding layer sees the last `window` tokens, its own included: the last columns of its cohort.
        w = -kwargs["sliding_window"] if key.window and kwargs.get("sliding_window") else 0
        out = torch.cat([F.scaled_dot_product_attention(query[a:b], k[:, :, w:], v[:, :, w:], attn_mask=m[..., w:],
                                                        scale=scaling) for a, b, k, v, m in key.parts])
        return out.reshape(rows, 1, heads, dim), None

    AttentionInterface.register(RAGGED_ATTENTION, attention)
    AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)
    return RAGGED_ATTENTION


@contextlib.contextmanager
def ragged_attention(model):
    """The model attends with register_ragged_attention()'s function (SDPA) while decoding."""
    before = model.config._attn_implementation
    model.set_attn_implementation(register_ragged_attention())
    try:
        yield
    finally:
        model.set_attn_implementation(before)
