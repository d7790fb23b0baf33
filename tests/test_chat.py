"""The chat format: p+/p- through the simulator's chat template, differing in the descriptor alone."""

from __future__ import annotations

import shutil

import jinja2
import pytest
import yaml

from rlcd_data import BuildConfig, RunOptions, build
from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.tasks.catalog import list_tasks, load_task
from rlcd_data.tasks.chat import ChatRenderer, resolve_format

MULTI = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a mean joke.\n\nAssistant:"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


class NoSystemTokenizer:
    """A chat template that refuses a system role, as some models' templates do."""

    chat_template = "user/assistant only"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        if any(m["role"] == "system" for m in messages):
            raise jinja2.TemplateError("System role not supported")
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def without_system(text: str) -> str:
    head, rest = text.split("<|im_start|>system\n", 1)
    return head + rest.split("<|im_end|>", 1)[1]


@pytest.mark.parametrize("name", ["harmless", "helpful", "outline"])
def test_p_plus_and_p_minus_differ_in_the_system_message_alone(name, tokenizer):
    task = load_task(name)
    chat = ChatRenderer(tokenizer, "smollm2")
    prompt = MULTI if task.input == "conversation" else "A dragon learns to knit."
    for seed in range(8):
        pair = task.render_pair(prompt, 0, seed, chat)
        assert pair.p_plus != pair.p_minus
        assert without_system(pair.p_plus) == without_system(pair.p_minus)
        system_plus = pair.p_plus.split("<|im_start|>system\n", 1)[1].split("<|im_end|>")[0]
        assert pair.descriptors.positive.removeprefix("simulating ") in system_plus
        assert pair.p_plus.endswith("<|im_start|>assistant\n" + ("" if task.input == "conversation" else
                                                                  "Here is a possible outline:\n1."))
        assert pair.prompt == task.render_pair(prompt, 0, seed).prompt  # the `prompt` column is the text form


def test_conversation_becomes_user_and_assistant_turns(tokenizer):
    pair = load_task("harmless").render_pair(MULTI, 0, 0, ChatRenderer(tokenizer))
    assert pair.p_plus.split("<|im_end|>\n", 1)[1] == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a mean joke.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Human" not in pair.p_plus and "Assistant" not in pair.p_plus


def test_a_template_without_a_system_role_gets_the_instruction_in_the_first_user_turn():
    text = ChatRenderer(NoSystemTokenizer()).contrast("Always be kind.", MULTI)
    assert text == ("<user>Always be kind.\n\nHi</user><assistant>Hello! How can I help?</assistant>"
                    "<user>Tell me a mean joke.</user><assistant>")


def test_comparison_puts_the_answer_opening_in_the_reply(tokenizer):
    task = load_task("harmless")
    text = task.render_comparison(MULTI, 0, "Sure.", "No.", ChatRenderer(tokenizer))
    assert text.endswith("<|im_start|>assistant\nThe answer is: (")
    assert "(A) Sure.\n(B) No.<|im_end|>" in text


def test_format_resolution(tokenizer):
    assert resolve_format("auto", True, tokenizer, "harmless", "m") == "chat"
    assert resolve_format("auto", False, tokenizer, "harmless", "m") == "text"
    assert resolve_format("auto", True, None, "harmless", "m") == "text"
    assert resolve_format("text", True, tokenizer, "harmless", "m") == "text"
    with pytest.raises(RlcdError, match="task 'mine' has no system.jinja"):
        resolve_format("chat", False, tokenizer, "mine", "m")
    with pytest.raises(RlcdError, match="tiny: its tokenizer has no chat template; use --prompt-format text"):
        resolve_format("chat", True, None, "harmless", "tiny")


def copy_harmless(tmp_path):
    root = tmp_path / "tasks"
    shutil.copytree(list_tasks()["harmless"], root / "harmless")
    return root, root / "harmless"


@pytest.mark.parametrize("source, message", [
    ("Always be nice.", r"system.jinja: never uses \{\{ descriptor \}\}"),
    ("{{ descriptor }} {{ positive }}", r"system.jinja: undefined template variable\(s\) positive"),
    ("{% if descriptor %}\n{{ descriptor }", r"system.jinja:2: template syntax error"),
])
def test_system_template_is_checked_when_the_task_loads(tmp_path, source, message):
    root, folder = copy_harmless(tmp_path)
    (folder / "system.jinja").write_text(source)
    with pytest.raises(RlcdError, match=message):
        load_task("harmless", root)


def test_chat_build_records_format_and_temperature_and_labels_in_chat(tmp_path, fake_generator, tokenizer):
    from test_methods import OptionLabeller

    generator = fake_generator(lambda prompt, n: ("good answer" if "Always give a" in prompt and " un" not in
                                                  prompt.split("<|im_end|>")[0] else "bad answer", True))
    generator.tokenizer = tokenizer
    labeller = OptionLabeller()
    config = BuildConfig(task="harmless", output=str(tmp_path / "out"), limit=4, method="rlcd-rescore")
    result = build(config, generator=generator, progress=False, labeller=labeller)
    assert result.stats.pairs == 4
    assert all(p.startswith("<|im_start|>system\n") for p in generator.requests[0])
    assert all(p.endswith("<|im_start|>assistant\nThe answer is: (") for p in labeller.prompts)
    saved = yaml.safe_load((tmp_path / "out" / "rlcd_build.yaml").read_text())
    assert (saved["prompt_format"], saved["temperature"]) == ("chat", 0.7)
    assert "Prompt format `chat`" in (tmp_path / "out" / "README.md").read_text()

    # The same command again with --resume converges (auto resolves as before); another format is refused.
    again = build(BuildConfig(**config.__dict__), RunOptions(resume=True), generator=generator, progress=False)
    assert again.complete_before
    with pytest.raises(RlcdError, match="prompt_format: 'chat' -> 'text'"):
        build(BuildConfig(**{**config.__dict__, "prompt_format": "text"}), RunOptions(resume=True), generator=generator,
              progress=False)


def test_preview_shows_what_the_model_sees(tmp_path, capsys, tiny_model_dir):
    assert main(["preview", "harmless", "-n", "1", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# prompt format: chat, temperature 0.7")
    assert "<|im_start|>system\nAnswer as if you were a wise, ethical person.<|im_end|>" in out
    assert main(["preview", "harmless", "-n", "1", "--model", str(tiny_model_dir), "--prompt-format", "text"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# prompt format: text, temperature 1.0") and "Assistant (" in out


def test_chat_format_for_a_task_without_system_template_is_a_one_line_error(tmp_path, capsys, tiny_model_dir):
    root, folder = copy_harmless(tmp_path)
    (folder / "system.jinja").unlink()
    code = main(["build", "harmless", "--templates", str(root), "--model", str(tiny_model_dir), "--prompt-format",
                 "chat", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "task 'harmless' has no system.jinja" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
