"""Carrying a soft-label column (``chosen_probability``) through TRL's preference trainers' batches.

TRL's reward and DPO trainers drop columns their loss does not use and their collators build tensors
from token ids only; the recipes that train on soft labels (reward, DPO) add the column back with
`soft_label_collator` and `SoftLabelColumn`, then read it in their own loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pairs import SOFT_LABEL_COLUMN


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
