"""Where the built-in templates and card templates live.

In an installed wheel they are inside the package (``rlcd_data/templates``,
``rlcd_data/cards``); in a source checkout they sit at the repository's top.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def resource_dir(name: str) -> Path:
    """Return the folder ``name`` (``templates`` or ``cards``) shipped with the package."""
    packaged = Path(str(resources.files("rlcd_data") / name))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name
