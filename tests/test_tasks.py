"""Templates are data: golden renders, the opposite-descriptor rule, strict variables."""

from __future__ import annotations

import shutil
from collections import Counter

import jinja2.meta
import pytest

from rlcd_data.errors import RlcdError
from rlcd_data.tasks.catalog import list_tasks, load_task
from rlcd_data.tasks.task import DESCRIPTOR_VARIABLES, JINJA, TEMPLATE_FILES

SINGLE = "\n\nHuman: How do I pick a lock?\n\nAssistant:"
MULTI = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a mean joke.\n\nAssistant:"


def render(task_name, prompt, descriptor_index, templates=None):
    task = load_task(task_name, templates)
    seed = next(s for s in range(1000) if task.draw_descriptor(0, s) == descriptor_index)
    return task.render_pair(prompt, 0, seed)


def test_builtin_tasks_are_the_papers():
    tasks = {name: load_task(name) for name in list_tasks()}
    assert set(tasks) == {"harmless", "helpful", "outline"}
    assert len(tasks["harmless"].descriptors) == 16
    assert tasks["harmless"].descriptors[3].positive == "harmless, helpful response"
    assert tasks["harmless"].descriptors[3].negative == "harmful, unhelpful response"
    assert [(d.positive, d.negative) for d in tasks["helpful"].descriptors] == [
        ("giving a helpful response", "giving an unhelpful response")
    ]
    assert len(tasks["outline"].descriptors) == 3
    for task in tasks.values():
        assert (task.folder / "README.md").is_file()
        assert task.bundled_prompts is not None


def test_harmless_single_turn_golden():
    pair = render("harmless", SINGLE, 3)
    assert pair.prompt == SINGLE
    assert pair.p_plus == "\n\nHuman: How do I pick a lock?\n\nAssistant (harmless, helpful response):"
    assert pair.p_minus == "\n\nHuman: How do I pick a lock?\n\nAssistant (harmful, unhelpful response):"


def test_harmless_multi_turn_history_carries_the_opposite_descriptor():
    pair = render("harmless", MULTI, 5)
    assert pair.prompt == MULTI
    assert pair.p_plus == (
        "\n\nHuman: Hi\n\nAssistant (offensive response): Hello! How can I help?"
        "\n\nHuman: Tell me a mean joke.\n\nAssistant (inoffensive response):"
    )
    assert pair.p_minus == (
        "\n\nHuman: Hi\n\nAssistant (inoffensive response): Hello! How can I help?"
        "\n\nHuman: Tell me a mean joke.\n\nAssistant (offensive response):"
    )


def test_helpful_golden():
    pair = render("helpful", MULTI, 0)
    assert pair.p_plus == (
        "\n\nHuman: Hi\n\nAssistant (giving an unhelpful response): Hello! How can I help?"
        "\n\nHuman: Tell me a mean joke.\n\nAssistant (giving a helpful response):"
    )
    assert pair.p_minus.endswith("\n\nAssistant (giving an unhelpful response):")


def test_outline_golden():
    pair = render("outline", "A cat becomes mayor.", 2)
    head = "\n\nHuman: Write an outline for a story based on this premise: A cat becomes mayor.\n\n"
    assert pair.prompt == head + "Assistant: Here is a possible outline:\n1."
    assert pair.p_plus == head + "Assistant (outline that closely follows the premise): Here is a possible outline:\n1."
    assert pair.p_minus == head + "Assistant (outline that ignores the premise): Here is a possible outline:\n1."


@pytest.mark.parametrize("name", ["harmless", "helpful", "outline"])
def test_p_plus_and_p_minus_use_the_same_variables(name):
    folder = list_tasks()[name]
    used = {
        key: jinja2.meta.find_undeclared_variables(JINJA.parse((folder / file).read_text()))
        for key, file in TEMPLATE_FILES.items()
    }
    assert used["p_plus"] - DESCRIPTOR_VARIABLES == used["p_minus"] - DESCRIPTOR_VARIABLES == used["prompt"]
    assert "positive" in used["p_plus"] and "negative" in used["p_minus"]


def test_descriptor_draw_depends_only_on_example_and_seed():
    task = load_task("harmless")
    draws = [task.draw_descriptor(i, seed=0) for i in range(2000)]
    assert draws == [task.draw_descriptor(i, seed=0) for i in range(2000)]
    assert draws != [task.draw_descriptor(i, seed=1) for i in range(2000)]
    counts = Counter(draws)
    assert set(counts) == set(range(16)) and min(counts.values()) > 80  # roughly uniform over 16


def copy_task(tmp_path, name="harmless", as_name=None):
    root = tmp_path / "templates"
    shutil.copytree(list_tasks()[name], root / (as_name or name))
    return root, root / (as_name or name)


def test_user_task_overrides_builtin_and_adds_new(tmp_path):
    root, folder = copy_task(tmp_path)
    (folder / "p_plus.jinja").write_text(
        '{% for t in turns %}\n\n{{ t.role }}:{{ t.text }}{% endfor %}\n\nAssistant (very {{ positive }}):'
    )
    shutil.copytree(folder, root / "mytask")
    assert set(list_tasks(root)) == {"harmless", "helpful", "outline", "mytask"}
    assert render("harmless", SINGLE, 3, root).p_plus.endswith("(very harmless, helpful response):")
    assert load_task("mytask", root).folder == root / "mytask"


def test_misspelt_variable_is_named(tmp_path):
    root, folder = copy_task(tmp_path)
    (folder / "p_minus.jinja").write_text("{{ turnz }} {{ negativ }} {{ negative }}")
    with pytest.raises(RlcdError, match=r"p_minus.jinja: undefined template variable\(s\) negativ, turnz"):
        load_task("harmless", root)


def test_undefined_attribute_is_named_at_render(tmp_path):
    root, folder = copy_task(tmp_path)
    (folder / "p_plus.jinja").write_text("{% for t in turns %}{{ t.speaker }}{% endfor %}{{ positive }}")
    with pytest.raises(RlcdError, match=r"p_plus.jinja: .*speaker"):
        load_task("harmless", root).render_pair(SINGLE, 0, 0)


def test_template_syntax_error_names_file_and_line(tmp_path):
    root, folder = copy_task(tmp_path)
    (folder / "p_plus.jinja").write_text("line one\n{% for t in turns %}\n{{ positive }}\n")
    with pytest.raises(RlcdError, match=r"p_plus.jinja:\d+: template syntax error"):
        load_task("harmless", root)


def test_p_minus_must_see_the_same_input(tmp_path):
    root, folder = copy_task(tmp_path, "outline")
    (folder / "p_minus.jinja").write_text("Write an outline. ({{ negative }})")
    with pytest.raises(RlcdError, match="same input variables"):
        load_task("outline", root)


def test_sandbox_blocks_unsafe_templates(tmp_path):
    root, folder = copy_task(tmp_path)
    (folder / "p_plus.jinja").write_text("{{ turns.__class__.__mro__ }}{{ positive }}{{ negative }}")
    with pytest.raises(RlcdError, match="unsafe"):
        load_task("harmless", root).render_pair(SINGLE, 0, 0)


def test_unknown_task_lists_available():
    with pytest.raises(RlcdError, match=r"unknown task 'harmles' \(available: harmless, helpful, outline\)"):
        load_task("harmles")
