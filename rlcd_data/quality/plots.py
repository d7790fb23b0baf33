"""PNG plots of a quality report (matplotlib, headless), for the dataset card and `compare`."""

from __future__ import annotations

from pathlib import Path

from .measures import PairData

IMAGES = "images"  # folder of a dataset repo the card links into
SIZE = (7.0, 4.0)  # inches; at DPI 100 a 700 x 400 PNG
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, nothing opens a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def lengths(data: PairData, path: Path, title: str = "Response lengths") -> None:
    """Overlaid histograms of chosen and rejected response lengths."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    top = max(data.chosen_lengths + data.rejected_lengths + [1])
    bins = min(40, top + 1)
    ax.hist(data.chosen_lengths, bins=bins, range=(0, top), alpha=0.55, label=f"chosen (mean {_mean(data.chosen_lengths):.0f})")
    ax.hist(data.rejected_lengths, bins=bins, range=(0, top), alpha=0.55, label=f"rejected (mean {_mean(data.rejected_lengths):.0f})")
    ax.set(xlabel=f"response length ({data.unit})", ylabel="responses", title=f"{title}, {len(data)} pairs")
    ax.legend()
    _save(fig, path)


def label_probabilities(data: PairData, path: Path) -> None:
    """Histogram of the soft label ``chosen_probability`` (0.5 = the labeller could not tell)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ax.hist(data.probabilities, bins=20, range=(0.5, 1.0), color="tab:purple")
    ax.set(xlabel="chosen_probability (labeller's P(chosen is better))", ylabel="pairs",
           title=f"Soft labels, {len(data)} pairs", xlim=(0.5, 1.0))
    _save(fig, path)


def descriptors(data: PairData, path: Path) -> None:
    """Pairs per descriptor pair (RLCD builds)."""
    plt = _pyplot()
    indices = sorted(set(data.descriptor_index or []))
    counts = [data.descriptor_index.count(i) for i in indices]
    labels = [f"{i}: {_short(data.descriptors.get(i, '').split(' / ')[0])}" for i in indices]
    fig, ax = plt.subplots(figsize=(SIZE[0], max(SIZE[1], 0.32 * len(indices) + 1)))
    ax.barh(range(len(indices)), counts, color="tab:green")
    ax.set_yticks(range(len(indices)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="pairs", title="Pairs per descriptor pair (its positive descriptor shown)")
    _save(fig, path)


def length_differences(named: dict[str, PairData], path: Path) -> None:
    """One overlay for `compare`: the distribution of chosen minus rejected length per dataset."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    differences = {name: [c - r for c, r in zip(d.chosen_lengths, d.rejected_lengths)] for name, d in named.items()}
    spread = max((abs(x) for values in differences.values() for x in values), default=1) or 1
    for name, values in differences.items():
        ax.hist(values, bins=40, range=(-spread, spread), histtype="step", linewidth=1.8,
                label=f"{name} (mean {_mean(values):+.0f})")
    ax.axvline(0, color="grey", linewidth=0.8)
    units = sorted({d.unit for d in named.values()})
    ax.set(xlabel=f"chosen length - rejected length ({' / '.join(units)})", ylabel="pairs",
           title="Length difference within each pair")
    ax.legend()
    _save(fig, path)


def write_report_plots(data: PairData, folder: Path) -> list[str]:
    """Write the report's plots under ``folder/images/``; returns their paths relative to ``folder``."""
    written = []

    def plot(function, name):
        function(data, folder / IMAGES / name)
        written.append(f"{IMAGES}/{name}")

    if len(data):
        plot(lengths, "lengths.png")
    if data.probabilities:
        plot(label_probabilities, "label-probabilities.png")
    if data.descriptor_index:
        plot(descriptors, "descriptors.png")
    return written


def _mean(values) -> float:
    return sum(values) / len(values) if values else 0.0


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
