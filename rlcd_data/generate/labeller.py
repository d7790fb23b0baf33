"""The RLAIF labeller: the simulator's own A/B preference, read from its next-token logits.

A comparison prompt (``compare.jinja`` of the task) shows the conversation, a
comparison instruction and two options, and ends with ``The answer is: (``.
The label is the softmax over the next-token logits of ``A`` and ``B``, where
``A`` and ``B`` are the single tokens the tokenizer produces for those
letters right after ``(``. Scoring is batched (longest first, left padding)
and uses the model already loaded for generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..errors import RlcdError

ANSWER_PREFIX = "The answer is: ("
OPTIONS = ("A", "B")


class Labeller(Protocol):
    """What the build needs to label pairs; tests substitute a fake."""

    def first_option_probability(self, prompts: Sequence[str]) -> list[float]: ...


def option_token_ids(tokenizer, prefix: str = ANSWER_PREFIX) -> tuple[int, int]:
    """The token ids of ``A`` and ``B`` as the tokenizer encodes them after ``prefix``.

    Raises:
        RlcdError: a letter does not encode as exactly one extra token there
            (the label would then not be a single next-token choice).
    """
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in OPTIONS:
        full = tokenizer(prefix + letter, add_special_tokens=False)["input_ids"]
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise RlcdError(
                f"the tokenizer does not encode {letter!r} after {prefix!r} as one token; "
                "the A/B labeller needs single-token options"
            )
        ids.append(full[-1])
    return ids[0], ids[1]


class TransformersLabeller:
    """P(A) from a causal LM's next-token logits over the two option tokens.

    Args:
        model, tokenizer: the loaded simulator (shared with the generator; no second copy).
        batch_size: prompts per forward pass.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.option_ids = option_token_ids(tokenizer)

    def first_option_probability(self, prompts: Sequence[str]) -> list[float]:
        import torch

        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

        def read(logits):
            return torch.softmax(logits[:, -1, list(self.option_ids)].float(), dim=-1)[:, 0].tolist()

        return forward_last(self.model, self.tokenizer, encoded, self.batch_size, read)


def forward_last(model, tokenizer, encoded: list[list[int]], batch_size: int, read, on_rows=None) -> list:
    """``read(logits)`` of every batch of token-id lists, in the order given.

    Batches go longest first with left padding, so position -1 is every row's last token (-2 the one
    before, and so on); ``read`` gets the logits of the last two positions and returns one value per row.
    ``on_rows(n)``, if given, is called after each batch with its number of rows (for a progress bar).
    """
    import torch

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list = [None] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(  # the vocabulary projection of the last two positions only
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                logits_to_keep=2,
            ).logits[:, -2:]
            for r, value in zip(rows, read(logits)):
                out[r] = value
            if on_rows:
                on_rows(len(rows))
    return out
