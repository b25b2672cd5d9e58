"""Colour in the human view: when to use it, and how, without letting a
name from the system change the terminal.

Names (devices, namespaces, tables, processes) are escaped after a block is
built (`inputs.escape` turns ESC into the text `\\x1b`), so colour cannot be
written as escape sequences while the block is built: they would be
escaped too.  The renderer marks what to colour with tokens made of
printable characters around a per-process random nonce, which escaping
leaves alone and no name can contain (it would have to guess the nonce);
`finish()` turns the tokens of the escaped text into SGR sequences.
"""
from __future__ import annotations

import os
import re
import secrets
from typing import TextIO

# restrained: what the kernel decided, and what changed the packet
RED, GREEN, YELLOW, CYAN, BOLD = "31", "32", "33", "36", "1"
_SGR_RESET = "\x1b[0m"

COLOR_CHOICES = ("auto", "always", "never")


def wanted(choice: str, stream: TextIO, environ=os.environ) -> bool:
    """--color auto|always|never.  auto: colour only on a terminal, and not
    when NO_COLOR is set to anything non-empty (https://no-color.org)."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    if environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):     # closed, or not a real stream
        return False


class Paint:
    """Marks text to colour (on) or leaves it as it is (off)."""

    def __init__(self, on: bool):
        self.on = on
        nonce = secrets.token_hex(8)
        self._open, self._close = f"⟦{nonce}:", f"⟧{nonce}⟧"
        self._token = re.compile(re.escape(self._open) + r"([0-9;]+)⟧|" + re.escape(self._close))

    def __call__(self, code: str, text: str) -> str:
        if not self.on or not code or not text:
            return text
        return f"{self._open}{code}⟧{text}{self._close}"

    def finish(self, text: str) -> str:
        """The escaped text with its marks turned into colour."""
        if not self.on:
            return text
        return self._token.sub(lambda m: f"\x1b[{m.group(1)}m" if m.group(1) else _SGR_RESET, text)


PLAIN = Paint(False)
