"""The built wheel carries the templates, card templates and training presets an installed rlcd-data needs."""

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
        for file in ("task.yaml", "prompt.jinja", "p_plus.jinja", "p_minus.jinja", "compare.jinja", "README.md",
                     "prompts.jsonl"):
            assert f"rlcd_data/templates/{task}/{file}" in names
    assert "rlcd_data/cards/dataset_card.md" in names
    for preset in ("reward-paper", "reward-cpu-small", "ppo-paper", "ppo-cpu"):
        assert f"rlcd_data/recipes/{preset}.yaml" in names
    for module in ("reward", "ppo", "sft", "common"):
        assert f"rlcd_data/train/{module}.py" in names
    for page in ("index.html", "app.js", "style.css"):  # `rlcd-data view` serves them from the package
        assert f"rlcd_data/view/static/{page}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
