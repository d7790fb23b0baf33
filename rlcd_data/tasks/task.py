"""Tasks: p+/p- templates as data, and rendering a contrast pair from a prompt.

A task is a folder with ``task.yaml`` (name, version, input kind, descriptor
pairs), ``prompt.jinja`` (the unmodified prompt), ``p_plus.jinja`` and
``p_minus.jinja`` (the text format), and optionally ``system.jinja`` (the chat
format: the system message, given one ``descriptor``; see `rlcd_data.chat`) and
``compare.jinja`` (the A/B labeller) and ``rate.jinja`` (the direct-RLAIF rater); `rlcd_data.task_files`
reads and checks a folder. All templates render in one sandboxed Jinja environment
with ``StrictUndefined``: a misspelt variable is an error, never a blank.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from ..errors import RlcdError
from .chat import ChatRenderer
from .conversation import Turn, parse_prompt

# What each kind of task input provides to its templates.
INPUT_VARIABLES = {
    "conversation": {"turns"},  # list of Turn(role, text) before the final Assistant tag
    "premise": {"premise"},  # one line of text, e.g. a story premise
}
DESCRIPTOR_VARIABLES = {"positive", "negative"}
TEMPLATE_FILES = {"prompt": "prompt.jinja", "p_plus": "p_plus.jinja", "p_minus": "p_minus.jinja"}
# The A/B comparison prompt of the RLAIF labeller (optional: without it a task
# supports only the methods that need no scorer).
COMPARE_FILE = "compare.jinja"
COMPARE_VARIABLES = {"instruction", "response_a", "response_b"}
ANSWER_START = "The answer is: ("  # how compare.jinja ends: the next token is the label
# A chat completions API cannot open the reply with ANSWER_START: the question ends with this instead.
ANSWER_ALONE = "Answer with the letter of the better option alone: A or B."
# The direct-RLAIF rater's prompt: the conversation and one response, ending where the 1-10 score comes next.
RATE_FILE = "rate.jinja"
RATE_VARIABLES = {"instruction", "response"}
RATING_START = "The rating is: ("
RATING_ALONE = "Answer with the rating alone: a whole number from 1 to 10."
# The chat format's system message: rendered once per side, so p+ and p- differ in the descriptor alone.
SYSTEM_FILE = "system.jinja"
SYSTEM_VARIABLES = {"descriptor"}

# User templates are untrusted input: sandboxed, and strict about undefined names.
JINJA = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass(frozen=True)
class DescriptorPair:
    positive: str
    negative: str


@dataclass(frozen=True)
class ContrastPair:
    """The three renders of one example; p+ and p- use the same descriptor pair."""

    source_index: int
    prompt: str  # unmodified prompt, the `prompt` column
    p_plus: str
    p_minus: str
    descriptor_index: int
    descriptors: DescriptorPair
    # What rlaif samples, where it is not `prompt`: on a chat API, the conversation as chat messages.
    prompt_request: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    version: int
    input: str
    prompt_source: str
    descriptors: tuple[DescriptorPair, ...]
    folder: Path
    templates: dict[str, jinja2.Template]
    instructions: tuple[str, ...] = ()  # comparison instructions: one per descriptor pair, or one for all
    scorer_version: int | None = None
    rating_instruction: str | None = None  # the rater's instruction (``rater:`` in task.yaml)
    rater_version: int | None = None

    @property
    def has_scorer(self) -> bool:
        return "compare" in self.templates

    @property
    def has_rater(self) -> bool:
        return "rate" in self.templates

    @property
    def has_chat(self) -> bool:
        return "system" in self.templates

    def instruction_index(self, descriptor_index: int) -> int:
        """The comparison instruction matched to a drawn descriptor pair (RLCD-Rescore, RLAIF)."""
        return descriptor_index if len(self.instructions) > 1 else 0

    def render_comparison(
        self, prompt_text: str, descriptor_index: int, response_a: str, response_b: str, chat: ChatRenderer | None = None
    ) -> str:
        """The labeller's prompt for one pair of responses, ending in ``The answer is: (``: the text
        format, or with ``chat`` the question as a user message and the reply opening with those words.

        Raises:
            RlcdError: the task has no compare.jinja, or it fails to render.
        """
        if not self.has_scorer:
            raise RlcdError(f"task {self.name!r} has no {COMPARE_FILE}: it cannot label pairs")
        values = {
            **self.variables(prompt_text),
            "instruction": self.instructions[self.instruction_index(descriptor_index)],
            "response_a": response_a.strip(),
            "response_b": response_b.strip(),
        }
        try:
            text = self.templates["compare"].render(values)
        except jinja2.TemplateError as e:
            raise RlcdError(f"{self.folder / COMPARE_FILE}: {getattr(e, 'message', e)}") from None
        return text if chat is None else chat.comparison(text, ANSWER_START, ANSWER_ALONE)

    def render_rating(self, prompt_text: str, response: str, chat: ChatRenderer | None = None) -> str:
        """The rater's prompt for one response, ending in ``The rating is: (`` (the score comes next):
        the text format, or with ``chat`` the question as a user message and the reply opening with it.

        Raises:
            RlcdError: the task has no rate.jinja, or it fails to render.
        """
        if not self.has_rater:
            raise RlcdError(f"task {self.name!r} has no {RATE_FILE}: it cannot rate responses")
        values = {**self.variables(prompt_text), "instruction": self.rating_instruction, "response": response.strip()}
        try:
            text = self.templates["rate"].render(values)
        except jinja2.TemplateError as e:
            raise RlcdError(f"{self.folder / RATE_FILE}: {getattr(e, 'message', e)}") from None
        return text if chat is None else chat.comparison(text, RATING_START, RATING_ALONE)

    @property
    def bundled_prompts(self) -> Path | None:
        path = self.folder / "prompts.jsonl"
        return path if path.is_file() else None

    def variables(self, prompt_text: str) -> dict:
        """Template variables for one source prompt (already normalised by `prompts`)."""
        if self.input == "conversation":
            return {"turns": parse_prompt(prompt_text)}
        return {"premise": prompt_text}

    def draw_descriptor(self, source_index: int, seed: int) -> int:
        """The descriptor pair for one example: depends only on the example and the seed."""
        return random.Random(f"rlcd-descriptor:{seed}:{source_index}").randrange(len(self.descriptors))

    def render_pair(self, prompt_text: str, source_index: int, seed: int, chat: ChatRenderer | None = None) -> ContrastPair:
        """Render the unmodified prompt, p+ and p- for one source prompt: in the text format, or in
        the chat format with ``chat`` (the simulator's chat template; the task needs system.jinja).

        Raises:
            RlcdError: if a template uses a variable the task does not provide.
        """
        k = self.draw_descriptor(source_index, seed)
        pair = self.descriptors[k]
        inputs = self.variables(prompt_text)
        prompt = self._render("prompt", inputs)
        if chat is None:
            values = {**inputs, "positive": pair.positive, "negative": pair.negative}
            p_plus, p_minus = self._render("p_plus", values), self._render("p_minus", values)
        else:
            p_plus, p_minus = (
                chat.contrast(self._render("system", {**inputs, "descriptor": d}), prompt)
                for d in (pair.positive, pair.negative)
            )
        request = chat.conversation(prompt) if chat is not None and chat.sends_messages else None
        return ContrastPair(source_index, prompt, p_plus, p_minus, k, pair, request)

    def _render(self, key: str, values: dict) -> str:
        filename = TEMPLATE_FILES.get(key, SYSTEM_FILE)
        try:
            return self.templates[key].render(values)
        except jinja2.UndefinedError as e:
            raise RlcdError(f"{self.folder / filename}: {e.message}") from None
        except jinja2.TemplateError as e:
            raise RlcdError(f"{self.folder / filename}: {e}") from None


__all__ = ["ContrastPair", "DescriptorPair", "Task", "Turn"]
