"""`mlx-rwkv chat`: an interactive loop whose recurrent state carries the conversation.

Lines starting with `/` are commands (`/help` lists them); an unknown command is an error,
never a prompt. A line starting with `//` is sent as text with one `/` removed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

from .output_files import OutputError, check_output
from .state import State, StateError

HELP = """commands:
  /save PATH    save the conversation state (refuses to replace an existing file)
  /save! PATH   save, replacing an existing state file (never the model file)
  /load PATH    continue from a saved state
  /reset        forget the conversation
  /help         this list
  /quit, /exit  leave (so does Ctrl-D)
  //text        send "/text" to the model"""


@dataclass
class ChatSession:
    """The conversation: the model, its state, and the files that must never be overwritten."""

    model: object
    state: State | None = None
    loaded: list[Path] = field(default_factory=list)  # the model file: /save! refuses it too
    err: TextIO = sys.stderr

    def command(self, line: str) -> bool:
        """Run a `/command`; False when the session should end."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if cmd in ("/quit", "/exit"):
                return False
            if cmd == "/help":
                print(HELP, file=self.err)
            elif cmd == "/reset":
                self.state = None
                print("[conversation reset]", file=self.err)
            elif cmd in ("/save", "/save!"):
                self._save(arg, force=cmd == "/save!")
            elif cmd == "/load":
                if not arg:
                    raise OutputError("usage: /load PATH")
                self.state = State.load(arg, self.model)
                print(f"[state loaded from {arg}]", file=self.err)
            else:
                print(f"error: unknown command {cmd} (/help lists them; start with // to send text "
                      "beginning with /)", file=self.err)
        except (OutputError, StateError, OSError) as e:
            print(f"error: {one_line(e)}", file=self.err)
        return True

    def _save(self, arg: str, force: bool) -> None:
        if not arg:
            raise OutputError("usage: /save PATH (or /save! PATH to replace an existing file)")
        path = check_output(arg, force=force, loaded=self.loaded, force_hint="/save! PATH")
        (self.state or self.model.new_state()).save(path, self.model, overwrite=force)
        print(f"[state saved to {path}]", file=self.err)


def one_line(e: Exception) -> str:
    """An error as one line: an OSError as 'reason: file' instead of '[Errno N] ...'."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def prompts(read: Callable[[str], str], session: ChatSession) -> Iterator[str]:
    """The user's text turns, running the commands in between; ends at /quit or end of input."""
    while True:
        try:
            line = read("User: ")
        except EOFError:
            return
        stripped = line.strip()
        if stripped.startswith("//"):
            yield stripped[1:]
        elif stripped.startswith("/"):
            if not session.command(stripped):
                return
        elif stripped:
            yield line


def turn_prompt(text: str) -> str:
    """One user turn in the RWKV World chat format; the model answers after `Assistant:`."""
    return f"User: {text}\n\nAssistant:"

