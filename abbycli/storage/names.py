"""User ids and image names made safe for every filesystem abby runs on.

User ids become folder names through a reversible encoding, so two different
ids can never share a folder, even where the filesystem ignores case (Windows,
macOS): the encoded form only ever contains lowercase ASCII letters, digits and
``- _ ^ %``.

* ``a-z 0-9 - _`` are kept as they are;
* an uppercase letter ``X`` becomes ``^x``;
* anything else becomes ``%hh`` for each of its UTF-8 bytes (lowercase hex).

Because ``decode_user_dir(encode_user_id(x)) == x`` for every accepted id,
the mapping is injective. Ids with control characters or path separators are
refused rather than encoded: they are never legitimate and an admin should
hear about them.

Image names only matter to humans, so they are cleaned rather than encoded;
uniqueness comes from the ledger id appended to every stored name.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from ..errors import InvalidInput

MAX_USER_ID_CHARS = 128
# A stored path is <root>\images\users\<folder>\<stem>-<id>.<ext>, and a default
# Windows refuses paths over 259 characters. With folders of at most 120
# characters, a root of up to ~100 characters always leaves room for a name.
MAX_USER_DIR_CHARS = 120
MAX_STEM_BYTES = 100
WINDOWS_MAX_PATH = 259  # MAX_PATH (260) less the terminating NUL, in UTF-16 units
NAME_MAX_BYTES = 255  # one path component, on NTFS, ext4 and APFS alike

_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_WINDOWS_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"]
    + [f"com{i}" for i in range(10)]
    + [f"lpt{i}" for i in range(10)]
)


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc"


# Characters that render as nothing: 'adm\u200bin' would show as 'admin' in every
# listing while being another user. Format (Cf), line/paragraph separators, lone surrogates.
_INVISIBLE = frozenset(["Cf", "Zl", "Zp", "Cs"])


def validate_user_id(user_id: object) -> str:
    """Return ``user_id`` if abby can store files for it, else raise InvalidInput."""
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)  # Discord snowflakes often arrive as ints
    if not isinstance(user_id, str):
        raise InvalidInput(f"user id must be a string, not {type(user_id).__name__}")
    if not user_id:
        raise InvalidInput("user id is empty")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise InvalidInput(f"user id is longer than {MAX_USER_ID_CHARS} characters")
    if user_id != user_id.strip():
        raise InvalidInput("user id has leading or trailing spaces")
    if any(_is_control(ch) for ch in user_id):
        raise InvalidInput("user id contains control characters")
    if any(unicodedata.category(ch) in _INVISIBLE for ch in user_id):
        raise InvalidInput("user id contains invisible characters (such as a zero-width space)")
    # NFC: 'é' typed as one character or as 'e' + accent is one user, not two.
    user_id = unicodedata.normalize("NFC", user_id)
    if "/" in user_id or "\\" in user_id:
        raise InvalidInput(f"user id {user_id!r} contains a path separator")
    return user_id


def encode_user_id(user_id: object) -> str:
    """The folder name for ``user_id`` (see the module docstring)."""
    user_id = validate_user_id(user_id)
    out = []
    for ch in user_id:
        if ch in _KEEP:
            out.append(ch)
        elif "A" <= ch <= "Z":
            out.append("^" + ch.lower())
        else:
            out.extend(f"%{b:02x}" for b in ch.encode("utf-8"))
    encoded = "".join(out)
    if encoded in _WINDOWS_RESERVED:
        # "con" is a device on Windows; escaping its first letter keeps the
        # mapping reversible ("%63on" can only come from "con").
        encoded = f"%{ord(encoded[0]):02x}" + encoded[1:]
    if len(encoded) > MAX_USER_DIR_CHARS:
        raise InvalidInput("user id is too long once made safe for the filesystem")
    return encoded


_TOKEN = re.compile(r"\^[a-z]|(?:%[0-9a-f]{2})+|[a-z0-9_-]")


def decode_user_dir(name: str) -> str | None:
    """The user id a folder name stands for, or None if abby never makes that name."""
    pos, out = 0, []
    while pos < len(name):
        m = _TOKEN.match(name, pos)
        if not m:
            return None
        tok = m.group()
        if tok[0] == "^":
            out.append(tok[1].upper())
        elif tok[0] == "%":
            try:
                out.append(bytes.fromhex(tok.replace("%", "")).decode("utf-8"))
            except UnicodeDecodeError:
                return None
        else:
            out.append(tok)
        pos = m.end()
    user_id = "".join(out)
    try:
        canonical = encode_user_id(user_id)
    except InvalidInput:
        return None
    return user_id if canonical == name else None


def clean_stem(image_name: object) -> str:
    """A harmless file-name stem from whatever name the caller offered.

    Keeps only the last path component, drops the extension (the stored one
    follows the real image format), replaces anything outside letters, digits,
    ``. _ -`` and space, trims dots and spaces at the ends (Windows drops them)
    and avoids Windows device names. Never fails: the fallback is "image".
    """
    name = str(image_name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if not _is_control(ch))
    stem, dot, _ext = name.rpartition(".")
    if not dot:
        stem = name
    stem = "".join(ch if (ch.isalnum() or ch in "._- ") else "_" for ch in stem)
    stem = re.sub(r"[_ ]{2,}", "_", stem).strip(" ._-")
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    encoded = stem.encode("utf-8")[:MAX_STEM_BYTES]
    stem = encoded.decode("utf-8", errors="ignore").rstrip(" ._-")
    return stem or "image"


def _path_units(text: str) -> int:
    """Length as Windows counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def fit_name(folder: str, stem: str, suffix: str, windows: bool = os.name == "nt") -> str:
    """``<stem><suffix>`` for a file in ``folder``, with the stem shortened so that the
    whole path stays within Windows' 259 characters (where ``windows``) and the name
    within 255 bytes. The suffix ('-<id>.png') is what makes the name unique and is
    always kept; raises InvalidInput if even the bare suffix does not fit."""
    room = NAME_MAX_BYTES
    if windows:
        room = min(room, WINDOWS_MAX_PATH - _path_units(folder) - 1)
    if _path_units(suffix) > room:
        raise InvalidInput(f"the storage folder {folder} is too long for Windows' 260-character path limit; "
                           "choose a shorter storage.root")
    while stem and (_path_units(stem + suffix) > room or len((stem + suffix).encode("utf-8")) > NAME_MAX_BYTES):
        stem = stem[:-1].rstrip(" ._-")
    return (stem or "image"[:max(0, room - _path_units(suffix))]) + suffix


def path_under(root: Path, *parts: str) -> Path:
    """Join ``parts`` to ``root`` and prove the result cannot escape it."""
    path = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise InvalidInput(f"path {path} would leave the storage root")
    return path
