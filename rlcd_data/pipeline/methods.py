"""The paper's method and its baselines: what each generates per example and how it labels it.

- ``rlcd``: p+ and p- outputs, labelled by construction (chosen = p+).
- ``rlcd-rescore``: the same p+/p- outputs (same seeds, so the same texts as an
  ``rlcd`` build), shuffled into A/B and labelled by the simulator's A/B
  preference with the instruction matched to the drawn descriptor pair.
- ``rlaif``: two independent samples from the unmodified prompt, labelled by
  the simulator's A/B preference.
- ``context-distillation``: the p+ output alone, as prompt-completion data for SFT.

Scored rows order chosen/rejected by the labeller's probability and keep it in
``chosen_probability`` (>= 0.5), the soft label a reward model trains on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..tasks.task import ANSWER_START, ContrastPair, Task

# Chain-of-thought labelling (--label-cot, Lee et al. 2023): the comparison is asked with this opening in
# place of the answer, the labeller continues it greedily for up to COT_TOKENS tokens, and the label is read
# after that rationale and the usual "The answer is: (".
COT_START = "Rationale:"
COT_TOKENS = 64


@dataclass(frozen=True)
class Method:
    name: str
    sides: tuple[str, ...]  # the outputs generated per example
    scored: bool  # labelled by the simulator's A/B preference
    labels: str  # for the card

    @property
    def writes_pairs(self) -> bool:
        """Whether the rows are chosen/rejected pairs (context distillation writes completions)."""
        return len(self.sides) == 2

    def request_text(self, pair: ContrastPair, side: str) -> str:
        if side == "p_plus":
            return pair.p_plus
        if side == "p_minus":
            return pair.p_minus
        return pair.prompt_request or pair.prompt  # rlaif: both samples from the unmodified prompt


METHODS = {
    "rlcd": Method("rlcd", ("p_plus", "p_minus"), False, "hard, by construction (chosen = output of p+)"),
    "rlcd-rescore": Method(
        "rlcd-rescore", ("p_plus", "p_minus"), True,
        "soft: the simulator's A/B probability on RLCD's p+/p- outputs (the by-construction label is kept)",
    ),
    "rlaif": Method("rlaif", ("a", "b"), True, "soft: the simulator's A/B probability on two samples of the same prompt"),
    "context-distillation": Method(
        "context-distillation", ("p_plus",), False, "none: prompt-completion data (the p+ output) for SFT"
    ),
}


def supported(task: Task) -> list[str]:
    """The methods a task supports: scored ones need its compare.jinja."""
    return [name for name, m in METHODS.items() if task.has_scorer or not m.scored]


def base_row(pair: ContrastPair, method: Method, outputs: dict[str, str], count_tokens) -> dict:
    """The row of one example before labelling (scored methods get their label in `label_rows`)."""
    if method.name == "context-distillation":
        return {
            "prompt": pair.prompt,
            "completion": outputs["p_plus"],
            "p_plus": pair.p_plus,
            "descriptor_index": pair.descriptor_index,
            "positive_descriptor": pair.descriptors.positive,
            "negative_descriptor": pair.descriptors.negative,
            "source_index": pair.source_index,
            "completion_tokens": count_tokens(outputs["p_plus"]),
        }
    if method.name == "rlaif":
        return {
            "prompt": pair.prompt,
            "chosen": outputs["a"],
            "rejected": outputs["b"],
            "instruction_index": pair.descriptor_index,
            "source_index": pair.source_index,
            "chosen_tokens": count_tokens(outputs["a"]),
            "rejected_tokens": count_tokens(outputs["b"]),
        }
    row = {
        "prompt": pair.prompt,
        "chosen": outputs["p_plus"],
        "rejected": outputs["p_minus"],
        "p_plus": pair.p_plus,
        "p_minus": pair.p_minus,
        "descriptor_index": pair.descriptor_index,
        "positive_descriptor": pair.descriptors.positive,
        "negative_descriptor": pair.descriptors.negative,
        "source_index": pair.source_index,
        "chosen_tokens": count_tokens(outputs["p_plus"]),
        "rejected_tokens": count_tokens(outputs["p_minus"]),
    }
    if method.name == "rlcd-rescore":
        row["chosen_is_p_plus"] = True
    return row


def label_rows(
    rows: list[dict], *, method: Method, task: Task, labeller, seed: int, both_orders: bool, chat=None, rationales=None
) -> list[dict]:
    """Label scored rows with the simulator's A/B preference, in one batched labeller call.

    Before: ``chosen`` is the first output (p+ for rlcd-rescore, sample a for
    rlaif). After: chosen/rejected ordered by the labeller, with
    ``chosen_probability`` the averaged probability of the one chosen and, for
    rlcd-rescore, ``chosen_is_p_plus`` whether that agrees with construction.

    rlcd-rescore shows the two outputs in a per-example random order (seeded);
    with ``both_orders`` every pair is scored as (A, B) and (B, A) and the two
    probabilities averaged, cancelling the labeller's position bias. ``chat``
    (a `ChatRenderer`) puts the comparison in the labeller's chat format. ``rationales`` (prompts ->
    continuations) makes it chain-of-thought labelling: the label is read after a rationale.
    """
    if not method.scored or not rows:
        return rows
    prompts: list[str] = []
    layout: list[tuple[bool, ...]] = []  # per row: for each order, whether the first output is shown as A
    for row in rows:
        if both_orders:
            orders = (True, False)
        elif method.name == "rlcd-rescore":
            orders = (random.Random(f"rlcd-rescore-order:{seed}:{row['source_index']}").random() < 0.5,)
        else:
            orders = (True,)
        layout.append(orders)
        key = row["descriptor_index"] if "descriptor_index" in row else row["instruction_index"]
        for first_is_a in orders:
            a, b = (row["chosen"], row["rejected"]) if first_is_a else (row["rejected"], row["chosen"])
            prompts.append(task.render_comparison(row["prompt"], key, a, b, chat))
    if rationales is not None:
        prompts = with_rationales(prompts, rationales)
    p_a = iter(labeller.first_option_probability(prompts))
    labelled = []
    for row, orders in zip(rows, layout):
        first = sum(p if first_is_a else 1 - p for first_is_a, p in zip(orders, p_a)) / len(orders)
        row = dict(row)
        if method.name == "rlaif":
            row["instruction_index"] = task.instruction_index(row["instruction_index"])
        if first < 0.5:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["chosen_tokens"], row["rejected_tokens"] = row["rejected_tokens"], row["chosen_tokens"]
            if method.name == "rlcd-rescore":
                row["chosen_is_p_plus"] = False
        row["chosen_probability"] = max(first, 1 - first)
        labelled.append(row)
    return labelled


def with_rationales(prompts: list[str], rationales) -> list[str]:
    """Comparison prompts (ending in ``The answer is: (``) with a rationale before the answer: each is asked
    with ``Rationale:`` instead, ``rationales`` continues them, and the answer follows the rationale."""
    asked = [p[: len(p) - len(ANSWER_START)] + COT_START for p in prompts]
    written = [r.split(ANSWER_START.split(":")[0])[0].strip() for r in rationales(asked)]
    return [f"{a} {r}\n{ANSWER_START}" for a, r in zip(asked, written)]
