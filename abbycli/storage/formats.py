"""Recognise the image formats abby stores, by their real signature, not their name."""

from __future__ import annotations

# format -> stored extension
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' from the first bytes, or None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None
