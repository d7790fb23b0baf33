"""Scoring texts with a trained reward model (a one-label sequence-classification model).

Texts are tokenized the way TRL's RewardTrainer tokenizes them in training
(text + the tokenizer's end-of-sequence token, special tokens added), and cut
from the left when too long, so the response at the end is always seen.
Encoder bases (BERT-style, no end-of-sequence token) use their ``[SEP]`` token.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RlcdError
from ..generate.models import pad_with


def end_token(tokenizer) -> str:
    """The token appended to every text: EOS, or SEP for encoders that have no EOS."""
    token = tokenizer.eos_token or tokenizer.sep_token
    if token is None:
        raise RlcdError(f"{tokenizer.name_or_path}: the tokenizer has neither an EOS nor a SEP token")
    return token


class RewardModel:
    """A reward model and its tokenizer, scoring batches of texts.

    Args:
        model: a sequence-classification model with ``num_labels == 1``.
        tokenizer: its tokenizer.
        max_length: longer texts keep their last ``max_length`` tokens.
        batch_size: texts per forward pass.
    """

    def __init__(self, model, tokenizer, max_length: int = 512, batch_size: int = 16):
        if getattr(model.config, "num_labels", 1) != 1:
            raise RlcdError(f"{model.name_or_path}: a reward model has one output, this one has {model.config.num_labels}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.end = end_token(tokenizer)
        pad_with(tokenizer, self.end)
        model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> RewardModel:
        """Load a reward model folder written by `rlcd-data train reward` (or any one-label classifier).

        Raises:
            RlcdError: not a model folder, or not a one-output classifier.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from ..generate.models import resolve_model

        source = resolve_model(str(path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
            # a LoRA adapter folder (quantized-base training) loads onto its base with peft
            adapter = (Path(source.path) / "adapter_config.json").is_file()
            if not adapter:  # refuse a language model or a classifier before loading its weights
                labels = AutoConfig.from_pretrained(source.path).num_labels
                if labels != 1:
                    raise RlcdError(f"{path}: a reward model has one output, this one has {labels}")
            extra = {"num_labels": 1} if adapter else {}
            model = AutoModelForSequenceClassification.from_pretrained(source.path, **extra)
        except OSError as e:
            raise RlcdError(f"cannot load reward model {str(path)!r}: {str(e).splitlines()[0]}") from None
        return cls(model, tokenizer, **kwargs)

    def score_responses(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One reward per (prompt, response): the score of the prompt followed by the response."""
        from ..tasks.conversation import as_completion

        return self.score([p + as_completion(p, r) for p, r in zip(prompts, responses)])

    def score(self, texts: list[str]) -> list[float]:
        """One scalar reward per text."""
        import torch

        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        scores: list[float] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                chunk = [t if t.endswith(self.end) else t + self.end for t in texts[start : start + self.batch_size]]
                enc = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.model.device)
                with torch.no_grad():
                    logits = self.model(**enc).logits
                scores.extend(logits[:, 0].float().tolist())
        finally:
            self.tokenizer.truncation_side = side
        return scores
