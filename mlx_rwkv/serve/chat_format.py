"""The RWKV World chat format: OpenAI `messages` -> prompt token pieces for the model.

The convention of the official demos, BlinkDL/ChatRWKV `API_DEMO_CHAT.py` (RWKV-7 World/G1):
each turn is `Role: text`, turns are separated by a blank line ("\\n\\n"), the text of a turn
is stripped and its runs of newlines are collapsed to one "\\n" (`re.sub(r"\\n+", "\\n", msg)`,
because a blank line ends a turn), and the model answers after `"Assistant:"` (no trailing
space: the answer's first token carries its own leading space). The demo feeds
`"User: " + msg + "\\n\\nAssistant:"` and stops the answer at "\\n\\n". RWKV-Runner
(`backend-python/routes/completion.py`, `chat_template`) writes system messages the same way
as `System: text` and stops at `"\\n\\nUser"` among others. So for
`[system S, user U1, assistant A1, user U2]` the prompt is

    System: S\\n\\nUser: U1\\n\\nAssistant: A1\\n\\nUser: U2\\n\\nAssistant:

and generation stops at the next turn ("\\n\\nUser:", "\\n\\nSystem:", "\\n\\nAssistant:")
or at a blank line, as the demo does ("\\n\\n"). OpenAI's "developer" role is written as System.

Each message is tokenized on its own and the pieces are concatenated, so the tokens of a
conversation are the tokens of its previous turns plus the new ones: a follow-up request
always extends the cached prefix of the earlier one (`cut_points` marks the message ends,
where the engine caches states, so conversations that share a system prompt share its state).
"""
from __future__ import annotations

import re
from typing import Sequence

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
GENERATION_PROMPT = "Assistant:"
TURN_SEPARATOR = "\n\n"
CHAT_STOPS = ("\n\n",)  # a blank line ends the answer (covers "\n\nUser:", "\n\nSystem:" ...)


def clean(text: str) -> str:
    """A turn's text as the official demo feeds it: stripped, newline runs collapsed to one."""
    return re.sub(r"\n+", "\n", text.replace("\r\n", "\n")).strip()


def message_texts(messages: Sequence[tuple[str, str]]) -> list[str]:
    """(role, content) pairs -> the text pieces of the prompt, ending with the generation prompt."""
    pieces = []
    for role, content in messages:
        if role not in ROLE_NAMES:
            raise ValueError(f"unknown role {role!r}; use system, developer, user or assistant")
        pieces.append(f"{ROLE_NAMES[role]}: {clean(content)}{TURN_SEPARATOR}")
    pieces.append(GENERATION_PROMPT)
    return pieces


def encode_chat(tokenizer, messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt token ids, cut points): each piece tokenized alone, then concatenated; the cut
    points are the token counts at the end of each message (where a state is worth caching)."""
    ids: list[int] = []
    cuts = []
    for piece in message_texts(messages):
        ids += tokenizer.encode(piece)
        cuts.append(len(ids))
    return ids, cuts[:-1]


def answer_text(generated: str) -> str:
    """The answer without the one space the model writes after "Assistant:"."""
    return generated[1:] if generated.startswith(" ") else generated
