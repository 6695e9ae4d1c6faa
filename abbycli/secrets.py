"""API keys: checked once where they are loaded, and scrubbed from every message.

A key is only ever sent in an HTTP header, so anything that cannot go in a
header (a stray CR from a Windows-edited file, a non-ASCII character pasted by
mistake) is refused when the key is loaded, with a message that never repeats
the key. ``redact`` is the second guard: it removes a known key, and any
``Bearer`` token, from text that came back from a provider before that text
can reach a terminal, a log or the ledger.
"""

from __future__ import annotations

import re

MASK = "********"

# RFC 9110 field values: visible ASCII and inner spaces/tabs. A key needs no spaces at all.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")


def clean_api_key(value: str) -> str:
    """The key with surrounding whitespace removed; ValueError (never echoing it) if unusable."""
    if not isinstance(value, str):
        raise ValueError("the API key must be a string")
    key = value.strip()
    if not key:
        raise ValueError("the API key is empty")
    if not _KEY_CHARS.fullmatch(key):
        raise ValueError("the API key contains characters that cannot be sent in an HTTP header "
                         "(spaces, control or non-ASCII characters); paste the key again")
    return key


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every given secret and every ``Bearer …`` token masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return _BEARER.sub(lambda m: m.group(1) + MASK, text)
