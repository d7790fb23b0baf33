"""Model-based parts of the quality report, run only when asked (they load or train models).

- `judge_agreement`: the share of pairs whose chosen an independent reward
  model prefers: the labels' accuracy as that judge sees it.
- `reward_model_separability`: the lexical separability's model-based
  cousin: k-fold, a reward model trained with the project's recipe on the
  other folds scores the held-out pairs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import RlcdError
from .measures import FOLDS, wilson_interval


def judge_agreement(table, judge: str, batch_size: int = 16, max_length: int = 512) -> dict:
    """Score every pair of ``table`` with the reward model folder ``judge``.

    Returns:
        pairs, accuracy (chosen scored strictly above rejected), its 95%
        interval, mean chosen probability, and the judge's path.

    Raises:
        RlcdError: ``judge`` is not a one-output reward model.
    """
    from ..sources.pairs import pair_texts
    from ..train.evaluate import agreement
    from ..train.reward_model import RewardModel

    if not Path(judge).expanduser().is_dir():
        raise RlcdError(f"{judge}: no such reward model folder")
    reward_model = RewardModel.load(judge, batch_size=batch_size, max_length=max_length)
    texts = [pair_texts(row, reward_model.tokenizer) for row in table]
    result = agreement(reward_model.score([c for c, _ in texts]), reward_model.score([r for _, r in texts]))
    low, high = wilson_interval(result["accuracy"] * result["pairs"], result["pairs"])
    return {**result, "ci95": [low, high], "judge": str(judge)}


def reward_model_separability(
    table, folds: int = FOLDS, base: str = "minilm-l6", preset: str = "reward-cpu-small", seed: int = 0
) -> dict:
    """k-fold agreement of reward models trained with `rlcd-data train reward` on the other folds.

    Each fold trains a fresh reward model on ``base`` (default: the embedded
    MiniLM-L6 encoder) with the ``preset`` recipe and measures its agreement
    on the held-out pairs; the pooled accuracy has a binomial 95% interval.

    Raises:
        RlcdError: fewer than two pairs per fold, or a base the recipe cannot load.
    """
    import numpy as np
    from sklearn.model_selection import KFold

    from ..train import reward
    from ..train.evaluate import write_jsonl

    n = len(table)
    if n < 2 * folds:
        raise RlcdError(f"reward-model separability needs at least {2 * folds} pairs for {folds} folds, got {n}")
    keep = [c for c in ("prompt", "chosen", "rejected") if c in table.column_names]
    rows = table.select_columns(keep).to_list()
    right, per_fold = 0.0, []
    with tempfile.TemporaryDirectory(prefix="rlcd-separability-") as tmp:
        for k, (train, test) in enumerate(KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.arange(n))):
            train_file, test_file = Path(tmp) / f"train-{k}.jsonl", Path(tmp) / f"test-{k}.jsonl"
            write_jsonl(train_file, [rows[i] for i in train])
            write_jsonl(test_file, [rows[i] for i in test])
            metrics = reward.main([
                "--dataset", str(train_file), "--model", base, "--preset", preset, "--seed", str(seed),
                "--output_dir", str(Path(tmp) / f"model-{k}"), "--eval_pairs", str(test_file),
                "--save_strategy", "no", "--disable_tqdm", "true", "--logging_strategy", "no",
            ])
            per_fold.append(metrics["eval_accuracy"])
            right += metrics["eval_accuracy"] * len(test)
    low, high = wilson_interval(right, n)
    return {"accuracy": right / n, "ci95": [low, high], "folds": folds, "per_fold": per_fold, "base": base,
            "preset": preset}
