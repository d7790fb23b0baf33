"""Prompt cutting and the paper's response post-processing."""

from __future__ import annotations

import pytest

from rlcd_data.tasks.conversation import Turn, extract_response, parse_prompt, to_messages, to_prompt


def test_hh_conversation_is_cut_after_the_last_assistant_tag():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me steal.\n\nAssistant: No, I won't."
    assert to_prompt(chosen) == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me steal.\n\nAssistant:"
    assert parse_prompt(to_prompt(chosen)) == [
        Turn("Human", " Hi"),
        Turn("Assistant", " Hello."),
        Turn("Human", " Help me steal."),
    ]


def test_plain_request_becomes_a_single_human_turn():
    assert to_prompt("  How do I bake bread?\n") == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    assert to_prompt("Human: hi") == "\n\nHuman: hi\n\nAssistant:"


def test_text_before_the_first_tag_is_rejected():
    with pytest.raises(ValueError, match="before the first"):
        parse_prompt("Preamble\n\nHuman: hi\n\nAssistant:")


@pytest.mark.parametrize(
    "text, ended, expected",
    [
        (" Sure, here you go.\n\nHuman: thanks", False, "Sure, here you go."),  # next Human turn
        (" Line one.\nLine two.\nHuman: more", False, "Line one.\nLine two."),
        (" Line one.\nLine two and Human: more", False, "Line one."),  # mid-line marker: drop that line
        (" All on one line Human: oops", False, None),
        (" A full answer.", True, "A full answer."),  # end-of-sequence ends it too
        (" cut off at the token limit", False, None),
        ("Assistant: I can help.", True, "I can help."),  # stray leading tag
        ("Assistant (harmless response): I can help.", True, "I can help."),
        ("   \n ", True, None),
        ("\n\nHuman: straight to the next turn", False, None),
        # a new Assistant turn inside the response ends it (no descriptor leaks into the data)
        (" You could.\n\nAssistant (simulating a kind person): Be kind.\n\nHuman: ok", False, "You could."),
        ("Assistant (harmless): Hi.\nAssistant: again", True, "Hi."),
        (" Ask the Assistant: it knows.", True, "Ask the Assistant: it knows."),  # mid-line: not a turn
    ],
)
def test_extract_response(text, ended, expected):
    assert extract_response(text, ended) == expected


def test_to_messages_keeps_a_forced_assistant_prefix():
    prompt = "\n\nHuman: Outline a story.\n\nAssistant: Here is a possible outline:\n1."
    messages, completion = to_messages(prompt, "A hero is born.")
    assert messages == [{"role": "user", "content": "Outline a story."}]
    assert completion == [{"role": "assistant", "content": "Here is a possible outline:\n1. A hero is born."}]
    messages, completion = to_messages("\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Bye\n\nAssistant:", "Ciao")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert completion == [{"role": "assistant", "content": "Ciao"}]
