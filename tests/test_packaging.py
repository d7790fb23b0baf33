"""The built wheel carries the templates and card templates an installed rlcd-data needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_ships_templates_and_cards(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(REPO), "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("rlcd_data-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for task in ("harmless", "helpful", "outline"):
        for file in ("task.yaml", "prompt.jinja", "p_plus.jinja", "p_minus.jinja", "README.md", "prompts.jsonl"):
            assert f"rlcd_data/templates/{task}/{file}" in names
    assert "rlcd_data/cards/dataset_card.md" in names
    assert any(n.endswith("entry_points.txt") for n in names)
