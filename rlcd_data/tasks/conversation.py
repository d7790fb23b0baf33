"""Human/Assistant conversations as in Anthropic HH-RLHF, and the paper's post-processing.

A conversation is text like ``"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: ..."``.
A *prompt* is a conversation cut right after its last ``\\n\\nAssistant:`` tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ASSISTANT_TAG = "\n\nAssistant:"
_TAG = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
# Where a response ends: the model starting the next Human turn.
STOP_STRINGS = ("\nHuman", "Human:")
_LEADING_ASSISTANT = re.compile(r"\AAssistant(?: \([^)\n]*\))?:")
_INNER_ASSISTANT = re.compile(r"\nAssistant(?: \([^)\n]*\))?:")


@dataclass(frozen=True)
class Turn:
    role: str  # "Human" or "Assistant"
    text: str  # as in the source, including its leading space


def to_prompt(text: str) -> str:
    """Normalise a source text to a prompt ending with the Assistant tag.

    An HH-RLHF conversation is cut right after its last ``\\n\\nAssistant:``;
    a text with no Assistant tag is taken as a single Human request.
    """
    cut = text.rfind(ASSISTANT_TAG)
    if cut >= 0:
        return text[: cut + len(ASSISTANT_TAG)]
    if text.startswith("Assistant:"):
        return "\n\n" + text[: len("Assistant:")]
    if _TAG.match(text):  # "Human: ..." with no Assistant turn yet
        return ("" if text.startswith("\n\n") else "\n\n") + text.rstrip() + ASSISTANT_TAG
    return f"\n\nHuman: {text.strip()}{ASSISTANT_TAG}"


def parse_prompt(prompt: str) -> list[Turn]:
    """The turns before the final Assistant tag of a prompt from `to_prompt`.

    Raises:
        ValueError: if text precedes the first Human/Assistant tag.
    """
    body = prompt[: -len(ASSISTANT_TAG)] if prompt.endswith(ASSISTANT_TAG) else prompt
    parts = _TAG.split(body)
    if parts[0].strip():
        raise ValueError(f"text before the first Human/Assistant tag: {parts[0][:40]!r}")
    return [Turn(role, text) for role, text in zip(parts[1::2], parts[2::2])]


def extract_response(text: str, ended: bool) -> str | None:
    """The paper's post-processing of one generated continuation.

    Args:
        text: the decoded new tokens, special tokens removed.
        ended: whether generation stopped at the end-of-sequence token (an
            instruction-tuned model ends its turn that way).

    Beyond the paper's rule, a new ``Assistant:`` (or ``Assistant (<descriptor>):``)
    turn at the start of a line inside the response ends it as well: base
    models write one, and it would carry a descriptor into the data.

    Returns:
        The response, or None if it failed: it neither reached the next Human
        turn nor ended with end-of-sequence (cut off at the token limit), or
        nothing is left after cleaning.
    """
    cuts = [i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0]
    if cuts:
        cut = min(cuts)
        head = text[:cut]
        if text[cut] != "\n" and not head.endswith("\n"):
            # "Human:" in mid-line: the line is part of the next turn; keep whole lines only.
            head = head[: head.rfind("\n")] if "\n" in head else ""
        text = head
    elif not ended:
        return None
    text = _LEADING_ASSISTANT.sub("", text.strip(), count=1).strip()
    # A new Assistant turn inside the response ends it too: it would carry a descriptor tag into the data.
    text = text[: m.start()].strip() if (m := _INNER_ASSISTANT.search(text)) else text
    return text or None


def as_completion(prompt: str, response: str) -> str:
    """The response as the continuation of ``prompt``, so that ``prompt + completion`` reads as the conversation.

    HH-RLHF (and TRL's copies of it) put the space after ``Assistant:`` at the
    start of the completion; a prompt ending in ``:`` gets one.
    """
    if prompt.endswith(":") and response and not response[0].isspace():
        return " " + response
    return response


def prompt_messages(prompt: str) -> tuple[list[dict], str]:
    """A prompt's conversation as chat messages (Human -> user, Assistant -> assistant), and the text
    after its final Assistant tag: the start of the reply the prompt forces (e.g. "Here is a possible
    outline:"), stripped; "" for most prompts."""
    cut = prompt.rfind(ASSISTANT_TAG)
    head, prefix = (prompt[:cut], prompt[cut + len(ASSISTANT_TAG) :]) if cut >= 0 else (prompt, "")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[t.role], "content": t.text.strip()} for t in parse_prompt(head)], prefix.strip()


def to_messages(prompt: str, response: str | None = None) -> tuple[list[dict], list[dict]]:
    """Split a prompt (+ response) into chat messages for TRL's conversational format.

    Text after the final Assistant tag of the prompt (e.g. a forced
    "Here is a possible outline:") becomes the start of the assistant message.

    Returns:
        (prompt_messages, completion_messages); the latter is empty without a response.
    """
    messages, prefix = prompt_messages(prompt)
    if response is None:
        return messages, []
    content = (prefix + " " + response).strip() if prefix else response
    return messages, [{"role": "assistant", "content": content}]
