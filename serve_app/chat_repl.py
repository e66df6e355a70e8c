"""The terminal chat behind `lorafleet infer`: streams answers, keeps history, takes a few commands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from serve_app.errors import LorafleetError

HELP = (
    "commands: 'clear' clears the history, 'reset-system' sets a new system prompt, "
    "'multi-line' / 'single-line' switch input mode (end multi-line input with '#'), 'exit' quits."
)


class ChatRepl:
    """Reads queries, streams responses through `stream(query, history, system)`, keeps history.

    `stream` yields the growing response text; the final text joins the history.
    """

    def __init__(
        self,
        stream: Callable,
        system: str | None,
        is_chat: bool,
        stdin: TextIO = sys.stdin,
        stdout: TextIO = sys.stdout,
    ):
        self.stream, self.system, self.is_chat = stream, system, is_chat
        self.stdin, self.stdout = stdin, stdout
        self.history: list[list[str]] = []
        self.multi_line = False

    def run(self) -> None:
        self._print(HELP if self.is_chat else "generation model: each input is completed on its own; 'exit' quits.")
        while (query := self._read()) is not None:
            if self._command(query):
                continue
            self._answer(query)

    def _command(self, text: str) -> bool:
        command = text.strip().lower()
        if command in ("exit", "quit"):
            raise SystemExit(0)
        if command == "clear":
            self.history = []
            self._print("history cleared.")
        elif command == "reset-system":
            self._print("new system prompt (empty for the model's default):")
            self.system = (self._readline("<<< [system] ") or "").strip() or None
            self.history = []
        elif command == "multi-line":
            self.multi_line = True
            self._print("multi-line input: end your message with a line ending in '#'.")
        elif command == "single-line":
            self.multi_line = False
        else:
            return not text.strip()
        return True

    def _answer(self, query: str) -> None:
        history = self.history if self.is_chat else []
        response, shown = "", 0
        try:
            for response, notice in self.stream(query, history, self.system):
                if notice:
                    self._print(f"[notice] {notice}")
                self.stdout.write(response[shown:])
                self.stdout.flush()
                shown = len(response)
        except LorafleetError as e:
            self._print(f"\n[error] {e.message}")
            return
        self._print("")
        if self.is_chat:
            self.history.append([query, response])

    def _read(self) -> str | None:
        first = self._readline("<<< ")
        if first is None or not self.multi_line:
            return first
        lines = [first]
        while not lines[-1].rstrip().endswith("#"):
            if (line := self._readline("")) is None:
                break
            lines.append(line)
        return "\n".join(lines).rstrip().removesuffix("#")

    def _readline(self, prompt: str) -> str | None:
        self.stdout.write(prompt)
        self.stdout.flush()
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def _print(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)
