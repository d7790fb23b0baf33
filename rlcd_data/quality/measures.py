"""Does a pair dataset carry the attribute, or noise? A model-free quality report.

The RLCD paper's argument is that p+/p- outputs differ more in the attribute
than i.i.d. samples do; its failure signatures are labels an independent judge
does not share, and pairs that differ in something else (length, format). The
report measures, for any pair dataset:

- shape: pairs, identical and near-identical pairs, empty, token-limit and
  unfinished responses, descriptor counts;
- length bias: lengths of both sides and the accuracy of "the longer one is
  chosen" as a classifier;
- what separates the sides: the most characteristic words of each (weighted
  log-odds with an informative Dirichlet prior, Monroe et al. 2008) and the
  cross-validated *lexical separability*: how often a bag-of-words logistic
  regression, trained on other pairs, scores chosen above rejected;
- soft labels, when the dataset has ``chosen_probability``.

Model-based figures (an independent judge's agreement, a reward model's
k-fold separability) are in `rlcd_data.quality_models`, run only when asked.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..sources.pairs import SOFT_LABEL_COLUMN, column, split_prompt

# Near-identical: cosine similarity of the two responses' word 1-2-gram counts at or above this.
NEAR_IDENTICAL = 0.9
FOLDS = 5
TOP_WORDS = 12
# A response whose last character is none of these ends mid-sentence.
_ENDINGS = ".!?\"'”’)]}*…"
_WORD = r"(?u)\b[^\W\d_][\w']+\b"


@dataclass
class PairData:
    """The two responses of every pair, as plain text, with what the dataset records about them.

    ``unit`` names what the lengths count: the simulator's tokens when the
    dataset records them (``chosen_tokens``/``rejected_tokens``), else words.
    """

    chosen: list[str]
    rejected: list[str]
    chosen_lengths: list[int]
    rejected_lengths: list[int]
    unit: str
    source_index: list[int] | None = None
    probabilities: list[float] | None = None
    chosen_is_p_plus: list[bool] | None = None
    descriptors: dict[int, str] = field(default_factory=dict)  # index -> "positive / negative"
    descriptor_index: list[int] | None = None
    max_new_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.chosen)

    def select(self, indices: list[int]) -> PairData:
        """The same data restricted to ``indices`` (in that order)."""

        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return PairData(
            chosen=pick(self.chosen), rejected=pick(self.rejected),
            chosen_lengths=pick(self.chosen_lengths), rejected_lengths=pick(self.rejected_lengths),
            unit=self.unit, source_index=pick(self.source_index), probabilities=pick(self.probabilities),
            chosen_is_p_plus=pick(self.chosen_is_p_plus), descriptors=self.descriptors,
            descriptor_index=pick(self.descriptor_index), max_new_tokens=self.max_new_tokens,
        )


def response_text(value, prompt=None) -> str:
    """The response alone: the assistant messages of a conversational completion, or the text after
    the last Assistant tag of an implicit-prompt conversation (HH-RLHF files), else the text itself."""
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value if m.get("role") == "assistant")
    return split_prompt(value)[1] if prompt is None else value


def pair_data(table, max_new_tokens: int | None = None) -> PairData:
    """Collect a report's inputs from a pair table (a `datasets.Dataset` with ``chosen``/``rejected``)."""
    columns = set(table.column_names)
    prompts = column(table, "prompt") if "prompt" in columns else [None] * len(table)
    chosen = [response_text(c, p).strip() for c, p in zip(column(table, "chosen"), prompts)]
    rejected = [response_text(r, p).strip() for r, p in zip(column(table, "rejected"), prompts)]
    if {"chosen_tokens", "rejected_tokens"} <= columns:
        unit = "simulator tokens"
        chosen_lengths, rejected_lengths = column(table, "chosen_tokens"), column(table, "rejected_tokens")
    else:
        unit = "words"
        chosen_lengths = [len(t.split()) for t in chosen]
        rejected_lengths = [len(t.split()) for t in rejected]
        max_new_tokens = None  # a token limit cannot be checked against word counts
    data = PairData(chosen, rejected, list(chosen_lengths), list(rejected_lengths), unit,
                    max_new_tokens=max_new_tokens)
    if "source_index" in columns:
        data.source_index = column(table, "source_index")
    if SOFT_LABEL_COLUMN in columns:
        data.probabilities = [float(p) for p in column(table, SOFT_LABEL_COLUMN)]
    if "chosen_is_p_plus" in columns:
        data.chosen_is_p_plus = column(table, "chosen_is_p_plus")
    if {"descriptor_index", "positive_descriptor", "negative_descriptor"} <= columns:
        data.descriptor_index = column(table, "descriptor_index")
        for i, pos, neg in zip(data.descriptor_index, column(table, "positive_descriptor"),
                               column(table, "negative_descriptor")):
            data.descriptors.setdefault(i, f"{pos} / {neg}")
    return data


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (ties counted as halves are allowed)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def report(data: PairData, *, threshold: float = NEAR_IDENTICAL, folds: int = FOLDS, seed: int = 0,
           similar: list[float] | None = None) -> dict:
    """The model-free report: one JSON-ready dict (see the module docstring for what it holds).
    ``similar``: the pairs' `similarities`, when already computed."""
    out = {"pairs": len(data), "shape": shape(data, threshold, similar), "lengths": length_bias(data)}
    out["words"] = characteristic_words(data.chosen, data.rejected)
    out["lexical_separability"] = lexical_separability(data.chosen, data.rejected, folds=folds, seed=seed)
    out["soft_labels"] = soft_labels(data) if data.probabilities is not None else None
    out["judge"] = out["reward_model_separability"] = None  # model-based: `rlcd_data.quality_models`
    out["human"] = None  # people's judgments: `report.human_figure`
    return out


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def similarities(chosen: list[str], rejected: list[str]) -> list[float]:
    """Cosine similarity of each pair's word 1-2-gram counts (1.0 for two empty texts)."""
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(ngram_range=(1, 2), alternate_sign=False, norm="l2", n_features=2**20)
    a, b = vectorizer.transform(chosen), vectorizer.transform(rejected)
    cosine = np.asarray(a.multiply(b).sum(axis=1)).ravel()
    both_empty = [not c.strip() and not r.strip() for c, r in zip(chosen, rejected)]
    return [1.0 if e else float(s) for s, e in zip(cosine, both_empty)]


def _empty(text: str) -> bool:
    return not text.strip()


def _unfinished(text: str) -> bool:
    return bool(text.strip()) and text.rstrip()[-1] not in _ENDINGS


def shape(data: PairData, threshold: float = NEAR_IDENTICAL, similar: list[float] | None = None) -> dict:
    identical = [_normalised(c) == _normalised(r) for c, r in zip(data.chosen, data.rejected)]
    similar = similarities(data.chosen, data.rejected) if similar is None else similar
    near = [s >= threshold and not same for s, same in zip(similar, identical)]

    def per_side(test):
        return {"chosen": sum(map(test, data.chosen)), "rejected": sum(map(test, data.rejected))}

    out = {
        "identical": sum(identical),
        "near_identical": sum(near),
        "near_identical_threshold": threshold,
        "empty": per_side(_empty),
        "unfinished": per_side(_unfinished),
        "at_token_limit": None,
        "descriptors": None,
    }
    if data.max_new_tokens:
        limit = data.max_new_tokens
        out["at_token_limit"] = {
            "chosen": sum(n >= limit for n in data.chosen_lengths),
            "rejected": sum(n >= limit for n in data.rejected_lengths),
            "limit": limit,
        }
    if data.descriptor_index is not None:
        counts = {i: data.descriptor_index.count(i) for i in sorted(set(data.descriptor_index))}
        out["descriptors"] = [{"index": i, "pair": data.descriptors.get(i, ""), "pairs": n} for i, n in counts.items()]
    return out


def row_flags(data: PairData, threshold: float = NEAR_IDENTICAL,
              similar: list[float] | None = None) -> list[list[str]]:
    """Each pair's flags, the rows behind `shape`'s counts: ``identical``, ``near-identical``, and per side
    ``chosen empty``, ``rejected unfinished`` (ends mid-sentence), ``chosen at token limit``."""
    similar = similarities(data.chosen, data.rejected) if similar is None else similar
    limit = data.max_new_tokens
    out = []
    for i, (chosen, rejected) in enumerate(zip(data.chosen, data.rejected)):
        flags = []
        if _normalised(chosen) == _normalised(rejected):
            flags.append("identical")
        elif similar[i] >= threshold:
            flags.append("near-identical")
        for side, text, length in (("chosen", chosen, data.chosen_lengths[i]),
                                   ("rejected", rejected, data.rejected_lengths[i])):
            flags += [f"{side} {name}" for name, hit in (("empty", _empty(text)), ("unfinished", _unfinished(text)),
                                                          ("at token limit", bool(limit) and length >= limit)) if hit]
        out.append(flags)
    return out


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "q1": 0.0, "q3": 0.0}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"mean": statistics.fmean(values), "median": median, "q1": q1, "q3": q3}


def length_bias(data: PairData) -> dict:
    """Lengths of each side, and how well "the longer response is chosen" predicts the label.

    That rule's accuracy counts a tie as half right (a coin flip): 0.5 means
    length says nothing about the label, 1.0 that length alone gives it.
    """
    n = len(data)
    longer = sum(c > r for c, r in zip(data.chosen_lengths, data.rejected_lengths))
    ties = sum(c == r for c, r in zip(data.chosen_lengths, data.rejected_lengths))
    return {
        "unit": data.unit,
        "chosen": _summary(data.chosen_lengths),
        "rejected": _summary(data.rejected_lengths),
        "chosen_longer": longer / n if n else 0.0,
        "ties": ties / n if n else 0.0,
        "longer_is_chosen_accuracy": (longer + ties / 2) / n if n else 0.5,
    }


def characteristic_words(chosen: list[str], rejected: list[str], top: int = TOP_WORDS) -> dict:
    """Words most characteristic of each side: weighted log-odds with an informative Dirichlet prior.

    Monroe, Colaresi & Quinn (2008), "Fightin' Words": the prior is the pooled
    counts of both sides, so frequent words need a large difference to rank
    and rare ones are shrunk towards zero. Each word gets a z-score
    ``delta / sqrt(var)``; positive is characteristic of chosen.
    """
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer

    if not any(chosen) and not any(rejected):
        return {"chosen": [], "rejected": []}
    vectorizer = CountVectorizer(token_pattern=_WORD, lowercase=True)
    try:
        counts = vectorizer.fit_transform(chosen + rejected)
    except ValueError:  # no words at all
        return {"chosen": [], "rejected": []}
    y_c = np.asarray(counts[: len(chosen)].sum(axis=0)).ravel().astype(float)
    y_r = np.asarray(counts[len(chosen) :].sum(axis=0)).ravel().astype(float)
    alpha = y_c + y_r
    n_c, n_r, a0 = y_c.sum(), y_r.sum(), alpha.sum()
    with np.errstate(divide="ignore", invalid="ignore"):  # a word that is a whole side's text has no odds
        delta = np.log((y_c + alpha) / (n_c + a0 - y_c - alpha)) - np.log((y_r + alpha) / (n_r + a0 - y_r - alpha))
        z = delta / np.sqrt(1 / (y_c + alpha) + 1 / (y_r + alpha))
    z = np.where(np.isfinite(z), z, 0.0)  # ranks neither side
    words = vectorizer.get_feature_names_out()
    order = np.argsort(z)

    def entry(i):
        return {"word": str(words[i]), "z": round(float(z[i]), 2), "chosen": int(y_c[i]), "rejected": int(y_r[i])}

    return {
        "chosen": [entry(i) for i in order[::-1][:top] if z[i] > 0],
        "rejected": [entry(i) for i in order[:top] if z[i] < 0],
    }


def lexical_separability(chosen: list[str], rejected: list[str], folds: int = FOLDS, seed: int = 0) -> dict | None:
    """Cross-validated accuracy of a bag-of-words classifier at telling chosen from rejected.

    Pairs are split into ``folds`` folds (both sides of a pair in the same
    fold). On each, a TF-IDF (word 1-2-grams) + logistic-regression classifier
    of "is this text a chosen one" is trained on the other folds and scores
    both sides of every held-out pair; the pair is right when chosen scores
    higher (a tie counts half). 0.5 is chance; near 1 means the sides differ
    in their words. Every pair is held out once, so the pooled accuracy has a
    binomial 95% interval; ``sd`` is the spread over folds. ``per_text`` is the
    classifier's accuracy on single texts (the pairwise figure's harder cousin).

    Returns None when there are fewer than two pairs per fold.
    """
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    n = len(chosen)
    if n < 2 * folds:
        return None
    right, fold_accuracies, text_right = 0.0, [], 0
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.arange(n)):
        texts = [chosen[i] for i in train] + [rejected[i] for i in train]
        labels = [1] * len(train) + [0] * len(train)
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if n >= 50 else 1,
                                     max_features=100_000)
        try:
            features = vectorizer.fit_transform(texts)
            model = LogisticRegression(max_iter=1000).fit(features, labels)
            score_c = model.decision_function(vectorizer.transform([chosen[i] for i in test]))
            score_r = model.decision_function(vectorizer.transform([rejected[i] for i in test]))
        except ValueError:  # empty vocabulary: nothing to tell the sides apart by
            score_c = score_r = np.zeros(len(test))
        fold_right = float((score_c > score_r).sum() + 0.5 * (score_c == score_r).sum())
        right += fold_right
        fold_accuracies.append(fold_right / len(test))
        text_right += int((score_c > 0).sum() + (score_r <= 0).sum())
    low, high = wilson_interval(right, n)
    return {
        "accuracy": right / n,
        "ci95": [low, high],
        "sd": statistics.stdev(fold_accuracies),
        "folds": folds,
        "per_text": text_right / (2 * n),
    }


def soft_labels(data: PairData) -> dict:
    """Statistics of ``chosen_probability`` (>= 0.5 by construction) and agreement with construction."""
    probabilities = data.probabilities or []
    edges = [0.5 + 0.05 * i for i in range(11)]
    counts = [0] * 10
    for p in probabilities:
        counts[min(int((p - 0.5) / 0.05), 9) if p >= 0.5 else 0] += 1
    out = {
        "mean": statistics.fmean(probabilities) if probabilities else None,
        "near_half": sum(p < 0.6 for p in probabilities) / len(probabilities) if probabilities else None,
        "histogram": {"edges": [round(e, 2) for e in edges], "counts": counts},
    }
    if data.chosen_is_p_plus is not None:
        out["agrees_with_construction"] = sum(data.chosen_is_p_plus) / len(data.chosen_is_p_plus)
    return out
