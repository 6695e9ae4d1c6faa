"""Hostile user ids and image names never escape the root or collide."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import assume, given, settings, strategies as st

from abbycli.errors import InvalidInput
from abbycli.storage.names import (MAX_STEM_BYTES, MAX_USER_DIR_CHARS, WINDOWS_MAX_PATH, clean_stem,
                                   decode_user_dir, encode_user_id, fit_name, path_under, validate_user_id)

WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
SAFE_DIR = re.compile(r"^[a-z0-9_^%-]+$")

user_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\"), min_size=1, max_size=40
).filter(lambda s: s == s.strip())


def folder_or_none(user_id):
    """The folder, or None for ids whose safe form is too long (those are refused)."""
    try:
        return encode_user_id(user_id)
    except InvalidInput as exc:
        assert "too long" in str(exc) or "invisible" in str(exc)
        return None


@given(user_ids)
def test_user_folder_is_safe_and_reversible(user_id):
    folder = folder_or_none(user_id)
    assume(folder is not None)
    assert SAFE_DIR.match(folder), folder
    assert folder == folder.lower()  # so case-insensitive filesystems cannot merge two users
    assert folder not in WINDOWS_RESERVED
    assert folder not in (".", "..")
    assert decode_user_dir(folder) == validate_user_id(user_id)  # the NFC form


@given(user_ids, user_ids)
def test_different_ids_never_share_a_folder_even_ignoring_case(a, b):
    fa, fb = folder_or_none(a), folder_or_none(b)
    assume(fa and fb and validate_user_id(a) != validate_user_id(b))
    assert fa.casefold() != fb.casefold()


def test_case_matters_for_user_ids():
    assert encode_user_id("Alice") == "^alice"
    assert encode_user_id("alice") == "alice"
    assert encode_user_id("ALICE") != encode_user_id("Alice")


@pytest.mark.parametrize("reserved", ["con", "nul", "com1", "lpt9", "aux", "prn"])
def test_windows_device_names_are_escaped(reserved):
    folder = encode_user_id(reserved)
    assert folder != reserved and folder.lower() not in WINDOWS_RESERVED
    assert decode_user_dir(folder) == reserved


def test_ids_whose_safe_form_is_too_long_are_refused():
    with pytest.raises(InvalidInput, match="too long"):
        encode_user_id("\U0001f600" * 20)  # 20 emoji: 240 characters once encoded


def test_snowflake_ids_stay_readable():
    assert encode_user_id(123456789012345678) == "123456789012345678"


@pytest.mark.parametrize("bad", ["", " alice", "alice ", "a\x00b", "a\nb", "../etc", "a/b", "C:\\x", "\\\\srv\\share",
                                 "x" * 129, None, 1.5])
def test_unsafe_user_ids_are_refused(bad):
    with pytest.raises(InvalidInput):
        validate_user_id(bad)
        encode_user_id(bad)


def test_traversal_looking_ids_without_separators_are_encoded_not_trusted():
    assert encode_user_id("..") == "%2e%2e"
    assert encode_user_id("C:") == "^c%3a"


@pytest.mark.parametrize("name", ["^Alice", "%zz", "ABC", "a%2f", "%63on".upper(), "", "%ff"])
def test_folders_abby_never_makes_do_not_decode(name):
    assert decode_user_dir(name) is None


hostile_names = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["../../etc/passwd", "..\\..\\windows\\system32", "C:\\evil.png", "\\\\server\\share\\x.png",
                     "/abs/path.png", "CON", "nul.png", "COM1.txt", "name. . .", "trailing ", "a\x00b.png",
                     ".hidden", "...", "", "x" * 500 + ".png", "lpt1.tar.gz"]),
)


@settings(max_examples=300)
@given(hostile_names)
def test_image_stems_are_always_harmless(name):
    stem = clean_stem(name)
    assert stem
    assert "/" not in stem and "\\" not in stem and ":" not in stem
    assert not any(ord(c) < 32 for c in stem)
    assert stem == stem.strip(" .")
    assert stem not in (".", "..")
    assert stem.split(".")[0].lower() not in WINDOWS_RESERVED
    assert len(stem.encode("utf-8")) <= MAX_STEM_BYTES


def test_image_names_keep_their_readable_part():
    assert clean_stem("../../etc/passwd") == "passwd"
    assert clean_stem("C:\\Users\\me\\sunset.png") == "sunset"
    assert clean_stem("CON.png") == "_CON"
    assert clean_stem("my cat!.jpg") == "my cat"
    assert clean_stem("") == "image"


def test_path_under_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert path_under(root, "images", "a") == root / "images" / "a"
    with pytest.raises(InvalidInput):
        path_under(root, "..", "outside")
    try:
        (root / "link").symlink_to(tmp_path)
    except OSError as exc:  # Windows without Developer Mode: WinError 1314
        pytest.skip(f"this OS does not let this user create symlinks: {exc}")
    if not os.path.islink(root / "link"):
        pytest.skip("symlink creation reported success but made nothing (Wine)")
    with pytest.raises(InvalidInput):
        path_under(root, "link", "x")


def test_ids_that_look_the_same_are_one_user():
    nfc, nfd = "Ren\u00e9", "Rene\u0301"
    assert validate_user_id(nfd) == validate_user_id(nfc) == nfc
    assert encode_user_id(nfd) == encode_user_id(nfc)


@pytest.mark.parametrize("bad", ["adm\u200bin", "\u200dadmin", "ad\u2028min", "x\ufeff", "a\ud800b"])
def test_invisible_characters_are_refused(bad):
    with pytest.raises(InvalidInput, match="invisible"):
        validate_user_id(bad)


def test_worst_case_stored_path_fits_windows_max_path():
    # The longest folder abby makes, the longest stem, a 19-digit id and a 90-character root.
    root = "C:\\" + "r" * 87
    longest_id = "%" * (MAX_USER_DIR_CHARS // 3)  # each '%' becomes '%25'
    folder = encode_user_id(longest_id)
    assert len(folder) == MAX_USER_DIR_CHARS
    user_path = f"{root}\\images\\users\\{folder}"
    stem = clean_stem("\u5c71" * 200)  # as long as a stem can be (100 bytes)
    name = fit_name(user_path, stem, f"-{2**63 - 1}.webp", windows=True)
    full = f"{user_path}\\{name}"
    assert len(full.encode("utf-16-le")) // 2 <= WINDOWS_MAX_PATH
    assert name.endswith(f"-{2**63 - 1}.webp") and name.startswith("\u5c71")


def test_a_root_too_long_for_windows_is_refused_with_a_clear_line():
    with pytest.raises(InvalidInput, match="shorter storage.root"):
        fit_name("C:\\" + "r" * 250, "cat", "-1.png", windows=True)


def test_names_are_not_shortened_where_paths_are_not_limited():
    assert fit_name("/" + "r" * 300, "a cat", "-1.png", windows=False) == "a cat-1.png"
