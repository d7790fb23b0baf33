"""Pair datasets with an optional soft-label column (``chosen_probability``) for TRL's preference trainers.

`pair_dataset` reads the pairs a recipe trains on. TRL's reward and DPO trainers drop columns their loss
does not use and their collators build tensors from token ids only; the recipes that train on soft labels
(reward, DPO) add the column back with `soft_label_collator` and `SoftLabelColumn`, then read it in their
own loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sources.pairs import SOFT_LABEL_COLUMN


def pair_dataset(script, check_soft_labels=None):
    """(the pairs of ``script.dataset`` in TRL's format, whether its soft labels are used).

    Only ``prompt``, ``chosen``, ``rejected`` and, unless ``script.hard_labels``, the soft-label column
    are kept; text completions continue their prompt (``"Assistant:" + " Sure"``), as builds write them.
    ``check_soft_labels(dataset, column)``, if given, runs first when soft labels are used.

    Raises:
        RlcdError: as `load_pairs` or ``check_soft_labels``.
    """
    from ..sources.pairs import load_pairs

    dataset = load_pairs(script.dataset, script.split, script.limit)
    soft = script.soft_label_column in dataset.column_names and not script.hard_labels
    if soft and check_soft_labels:
        check_soft_labels(dataset, script.soft_label_column)
    keep = ["prompt", "chosen", "rejected"] + ([script.soft_label_column] if soft else [])
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    if "prompt" in dataset.column_names and isinstance(dataset[0]["prompt"], str):
        from ..sources.pairs import to_standard

        dataset = dataset.map(to_standard)
    return dataset, soft


def soft_label_collator(base: type) -> type:
    """A subclass of TRL's preference collator ``base`` that also passes the soft-label column as floats."""
    import torch

    @dataclass
    class SoftLabelCollator(base):
        soft_label_column: str = SOFT_LABEL_COLUMN

        def torch_call(self, examples):
            probabilities = [e.pop(self.soft_label_column) for e in examples if self.soft_label_column in e]
            batch = super().torch_call(examples)
            if probabilities:
                batch[self.soft_label_column] = torch.tensor(probabilities, dtype=torch.float)
            return batch

    return SoftLabelCollator


class SoftLabelColumn:
    """A mixin for a TRL trainer: ``soft_label_column`` is kept among the columns its batches carry."""

    def __init__(self, *args, soft_label_column: str = SOFT_LABEL_COLUMN, **kwargs):
        self.soft_label_column = soft_label_column
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.soft_label_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.soft_label_column]
