"""Building stores for the benchmarks quickly: files written directly, rows inserted in bulk.

The rows go through abby's real schema and triggers, so the totals are exact
(`abby check` finds nothing to fix), without paying 200,000 separate saves.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from abbycli import StorageManager
from abbycli.storage.backend import ImageRow
from abbycli.storage.names import encode_user_id

DAY = 86400


def png_bytes(size: int) -> bytes:
    """A real PNG padded to ``size`` bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 40, 200)).save(buf, "PNG")
    data = buf.getvalue()
    return data + b"\0" * max(0, size - len(data))


def build_store(root: Path, files: int, users: int, expired: int = 0, size: int = 200,
                age_days: float = 30) -> StorageManager:
    """A store with ``files`` images spread over ``users``; the first ``expired`` are ``age_days`` old."""
    sm = StorageManager(root, max_global_storage_mb=10**6, max_user_storage_mb=10**5, max_user_daily_gens=10**6)
    sm.blobs.prepare()
    sm.ledger.open()  # an empty ledger first: made after the files, it would be rebuilt from them
    data = png_bytes(size)
    now = time.time()
    rows = []
    made_dirs = set()
    for i in range(files):
        user = f"user{i % users}"
        folder = encode_user_id(user)
        key = f"users/{folder}/bench-{i}.png"
        if folder not in made_dirs:
            (root / "images" / "users" / folder).mkdir(parents=True, exist_ok=True)
            made_dirs.add(folder)
        created = now - age_days * DAY if i < expired else now - 60
        write_file(root / "images" / key, data, created)
        rows.append(ImageRow(None, user, key, len(data), "png", created))
    with sm.ledger.write() as tx:
        tx.insert_images(rows)
    return sm


def write_file(path: Path, data: bytes, mtime: float) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(path, (mtime, mtime))


def restore_expired(sm: StorageManager, root: Path, expired: int, users: int, size: int = 200,
                    age_days: float = 30, ledger: bool = True) -> None:
    """Put back the ``expired`` old images (and, for abby's store, their rows) after a cleanup run."""
    data = png_bytes(size)
    created = time.time() - age_days * DAY
    rows = []
    for i in range(expired):
        user = f"user{i % users}"
        folder = root / "images" / "users" / encode_user_id(user)
        folder.mkdir(parents=True, exist_ok=True)
        key = f"users/{encode_user_id(user)}/bench-{i}.png"
        write_file(root / "images" / key, data, created)
        rows.append(ImageRow(None, user, key, len(data), "png", created))
    if ledger:
        with sm.ledger.write() as tx:
            tx.insert_images(rows)
