"""The chat format: contrast and comparison prompts rendered with the simulator's own chat template.

An instruction-tuned model was trained on its chat template, not on raw
``Human: ... Assistant (descriptor):`` text. In the chat format the task's
``system.jinja`` carries the descriptor as a system message, the conversation
follows as user/assistant turns, and the tokenizer's ``apply_chat_template``
renders it with the generation prompt, so p+ and p- differ in the descriptor
alone. Text after the source prompt's final Assistant tag (a forced start such
as "Here is a possible outline:") opens the reply.

A chat-only server (a hosted API) applies the template itself: `MessagesRenderer`
renders the same messages as JSON for its chat completions API instead.
"""

from __future__ import annotations

import json

from ..errors import RlcdError
from .conversation import prompt_messages

FORMATS = ("auto", "text", "chat")


def _no_template(model_name: str) -> RlcdError:
    return RlcdError(f"{model_name}: its tokenizer has no chat template; use --prompt-format text")


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


class ChatRenderer:
    """Renders messages with one tokenizer's chat template, ending where the assistant's reply begins."""

    sends_messages = False  # a prompt string, not the messages (see `MessagesRenderer`)

    def __init__(self, tokenizer, model_name: str = "the simulator"):
        if not has_chat_template(tokenizer):
            raise _no_template(model_name)
        self.tokenizer = tokenizer
        self.model_name = model_name

    def contrast(self, system: str, prompt: str) -> str:
        """p+ or p-: ``system`` (the rendered system.jinja) and the conversation of a text ``prompt``."""
        messages, opening = prompt_messages(prompt)
        return self.render(messages, system=system, opening=opening)

    def conversation(self, prompt: str) -> str:
        """A text prompt as the model sees it in the chat format, with no system message of ours
        (the template's own default, if it has one): how a policy is sampled and evaluated."""
        messages, opening = prompt_messages(prompt)
        return self.render(messages, opening=opening)

    def comparison(self, text: str, answer_start: str, answer_alone: str = "") -> str:
        """The labeller's prompt: ``text`` up to ``answer_start`` as the user's message, and the
        assistant's reply opening with ``answer_start`` (so the label is still the next token).
        ``answer_alone`` is for `MessagesRenderer`, which cannot open the reply."""
        return self.render([{"role": "user", "content": _question(text, answer_start)}], opening=answer_start)

    def render(self, messages: list[dict], system: str | None = None, opening: str = "") -> str:
        import jinja2

        attempts = [messages]
        if system is not None:
            attempts = [[{"role": "system", "content": system}, *messages]]
            if messages and messages[0]["role"] == "user":
                # A template without a system role (it raises): the instruction leads the first user turn.
                attempts.append([{"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}, *messages[1:]])
        for candidate in attempts:
            try:
                return self._apply(candidate) + opening
            except jinja2.TemplateError as e:
                error = e
        raise RlcdError(f"{self.model_name}: its chat template refused the conversation ({error})")

    def _apply(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _question(text: str, answer_start: str) -> str:
    return (text[: len(text) - len(answer_start)] if text.endswith(answer_start) else text).strip()


class MessagesRenderer(ChatRenderer):
    """The chat format for a server's chat completions API (`--server-api chat`): each prompt is its messages
    as a JSON list (`decode_messages`), and the server applies the model's template. The messages are the ones
    `ChatRenderer` renders, with two differences the API forces, as it cannot continue an assistant reply:
    a prompt that opens the reply is refused, and the labeller's question ends with an instruction to answer
    alone (``answer_alone``) where the text and chat formats open the reply with ``The answer is: (``.
    The unmodified prompt (what rlaif samples) goes as its turns without a system message.
    """

    sends_messages = True

    def __init__(self, model_name: str = "the simulator"):
        self.tokenizer, self.model_name = None, model_name

    def comparison(self, text: str, answer_start: str, answer_alone: str = "") -> str:
        question = _question(text, answer_start)
        return self.render([{"role": "user", "content": f"{question}\n\n{answer_alone}".strip()}])

    def render(self, messages: list[dict], system: str | None = None, opening: str = "") -> str:
        if opening:
            raise RlcdError(f"--server-api chat: a prompt opens the assistant's reply ({opening[:60]!r}), which the "
                            "chat completions API cannot continue; use a server's completions API")
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return json.dumps(messages, ensure_ascii=False)


def decode_messages(prompt: str) -> list[dict]:
    """The messages a `MessagesRenderer` rendered."""
    return json.loads(prompt)


def resolve_format(requested: str, task_has_chat: bool, tokenizer, task_name: str, model_name: str,
                   messages: bool = False) -> str:
    """``text`` or ``chat`` for ``--prompt-format``: ``auto`` is chat when both the task and the model's
    tokenizer can render it, text otherwise. With ``messages`` (a chat completions API, which applies
    the template itself) it is chat, whatever the tokenizer.

    Raises:
        RlcdError: ``chat`` asked of a task without system.jinja or a tokenizer without a chat template;
            ``text`` or a task without system.jinja with ``messages``.
    """
    if messages:
        if requested == "text":
            raise RlcdError("--server-api chat sends chat messages: --prompt-format text needs the completions API")
        if not task_has_chat:
            raise RlcdError(f"task {task_name!r} has no system.jinja: it renders in the text format only, which "
                            "needs the completions API (--server-api completions)")
        return "chat"
    if requested == "text":
        return "text"
    if requested == "chat":
        if not task_has_chat:
            raise RlcdError(f"task {task_name!r} has no system.jinja: it renders in the text format only")
        if not has_chat_template(tokenizer):
            raise _no_template(model_name)
        return "chat"
    return "chat" if task_has_chat and has_chat_template(tokenizer) else "text"


def policy_prompts(texts: list[str], tokenizer, requested: str, model_name: str) -> tuple[list[str], str]:
    """Text prompts as a policy is sampled with them (PPO rollouts, `eval policy`): as they are in the text
    format, through the policy's own chat template (no system message of ours) in the chat format.

    Returns:
        (prompts, the resolved format); ``auto`` is chat when the tokenizer has a chat template.
    """
    resolved = resolve_format(requested, True, tokenizer, "policy", model_name)
    if resolved == "text":
        return list(texts), resolved
    chat = ChatRenderer(tokenizer, model_name)
    return [chat.conversation(t) for t in texts], resolved
