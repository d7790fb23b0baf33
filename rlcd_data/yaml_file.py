"""Reading a YAML mapping with errors that name the file and line."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import RlcdError


def read_mapping(path: str | Path, what: str = "file") -> dict:
    """The mapping a YAML file holds (an empty file is an empty mapping).

    Raises:
        RlcdError: the file is missing, is not valid YAML (``file:line``), or holds no mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise RlcdError(f"{path}: no such {what}") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise RlcdError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RlcdError(f"{path}: expected a mapping of names to values")
    return data
