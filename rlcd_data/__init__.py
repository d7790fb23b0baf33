"""rlcd-data: simulate RLCD preference datasets (Yang et al., ICLR 2024) and train on them.

    >>> from rlcd_data import BuildConfig, build
    >>> result = build(BuildConfig(task="harmless", limit=8, output="out/harmless"))

Heavy libraries (torch, transformers, datasets) are imported only when used.
"""

from .errors import RlcdError
from .pipeline.config import BuildConfig
from .pipeline.run_options import RunOptions

__version__ = "0.1.0"


def build(config, options=None, generator=None, progress=True, labeller=None):
    """Build a dataset; see `rlcd_data.pipeline.build`."""
    from .pipeline.run import build as _build

    return _build(config, options, generator=generator, progress=progress, labeller=labeller)


def load_task(name, templates_dir=None):
    """Load a task by name; see `rlcd_data.tasks.load_task`."""
    from .tasks.catalog import load_task as _load_task

    return _load_task(name, templates_dir)


__all__ = ["BuildConfig", "RlcdError", "RunOptions", "__version__", "build", "load_task"]
