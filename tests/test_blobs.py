"""The BlobStore seam: LocalBlobStore keeps the interface's promises (create-only commits,
no link followed, never outside the root), and the store facade, cleanup and check work
on a store that has no files at all (an in-memory BlobStore built on the real interface)."""

from __future__ import annotations

import io
import os
import time

import pytest

from abbycli import NotFound, StorageError, StorageManager
from abbycli.storage.blobs import (DELETED, MISSING, UNSAFE, BlobExists, BlobInfo, BlobStore, LocalBlobStore,
                                   Staged)
from conftest import make_png


@pytest.fixture
def blobs(root):
    return LocalBlobStore(root)


def put(store: BlobStore, key: str, data: bytes) -> None:
    store.commit(store.stage(data), key)


def test_commit_is_create_only(blobs, root):
    put(blobs, "users/alice/a-1.png", b"first")
    staged = blobs.stage(b"second")
    with pytest.raises(BlobExists):
        blobs.commit(staged, "users/alice/a-1.png")
    assert blobs.read("users/alice/a-1.png") == b"first"  # never overwritten
    blobs.discard(staged)
    blobs.discard(staged)  # idempotent
    assert list((root / "temp").iterdir()) == []


def test_list_stat_open_and_paths(blobs, root):
    for key in ("users/alice/a-1.png", "users/alice/b-2.png", "users/bob/c-3.png"):
        put(blobs, key, key.encode())
    assert sorted(i.key for i in blobs.list()) == ["users/alice/a-1.png", "users/alice/b-2.png", "users/bob/c-3.png"]
    assert sorted(i.key for i in blobs.list("users/al")) == ["users/alice/a-1.png", "users/alice/b-2.png"]
    assert [i.key for i in blobs.list("users/bob/")] == ["users/bob/c-3.png"]
    info = blobs.stat("users/bob/c-3.png")
    assert isinstance(info, BlobInfo) and info.size == len(b"users/bob/c-3.png")
    assert blobs.stat("users/bob/none.png") is None
    with blobs.open("users/alice/a-1.png") as fh:
        assert fh.read() == b"users/alice/a-1.png"
    with pytest.raises(NotFound):
        blobs.open("users/alice/none.png")
    assert blobs.local_path("users/bob/c-3.png") == root / "images" / "users" / "bob" / "c-3.png"
    assert blobs.url("users/bob/c-3.png", 60) is None and blobs.describe() == str(root / "images")


@pytest.mark.parametrize("key", ["../x.png", "users/../../x.png", "/etc/passwd", "users\\a\\b.png", "", "users//a"])
def test_a_malformed_key_is_never_acted_on(blobs, key):
    with pytest.raises(StorageError):
        blobs.open(key)
    with pytest.raises(StorageError):
        blobs.commit(blobs.stage(b"x"), key)
    assert blobs.delete([key]) == {key: UNSAFE}


def test_delete_outcomes(blobs):
    put(blobs, "users/alice/a-1.png", b"x")
    assert blobs.delete(["users/alice/a-1.png", "users/alice/gone.png"]) == {
        "users/alice/a-1.png": DELETED, "users/alice/gone.png": MISSING}


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symlinks")
def test_links_are_never_followed(blobs, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    put(blobs, "users/alice/a-1.png", b"x")
    os.symlink(outside / "secret.png", root / "images" / "users" / "alice" / "link.png")
    os.symlink(outside, root / "images" / "users" / "mallory")
    assert blobs.stat("users/alice/link.png") is None
    with pytest.raises(StorageError, match="link"):
        blobs.open("users/alice/link.png")
    assert [i.key for i in blobs.list()] == ["users/alice/a-1.png"]
    with pytest.raises(StorageError, match="link"):
        blobs.commit(blobs.stage(b"y"), "users/mallory/m-1.png")
    assert blobs.delete(["users/mallory/secret.png"]) == {"users/mallory/secret.png": UNSAFE}
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]


def test_open_image_reads_a_stored_image(storage):
    image = storage.store(make_png(1000), "alice")
    assert image.key == f"users/alice/{image.path.name}"
    with storage.open_image(image) as fh:
        assert fh.read() == make_png(1000)
    assert storage.get_image(image.key).id == image.id  # keys are accepted where paths are


# --- a store without files --------------------------------------------------------------

class MemoryBlobStore(BlobStore):
    """Blobs in a dict, as an object store would hold them: no paths, no folders, no temp files."""

    name = "memory"

    def __init__(self):
        self.blobs: dict[str, tuple[bytes, float]] = {}

    def describe(self) -> str:
        return "memory://test"

    def stage(self, data: bytes) -> Staged:
        return Staged(len(data), data=data)

    def commit(self, staged: Staged, key: str) -> None:
        if key in self.blobs:
            raise BlobExists(f"memory://test/{key} exists")
        self.blobs[key] = (staged.data, time.time())

    def discard(self, staged: Staged) -> None:
        staged.data = None

    def delete(self, keys):
        return {k: DELETED if self.blobs.pop(k, None) is not None else MISSING for k in keys}

    def list(self, prefix: str = ""):
        for key in sorted(self.blobs):
            if key.startswith(prefix):
                yield self.stat(key)

    def stat(self, key: str):
        if key not in self.blobs:
            return None
        data, modified = self.blobs[key]
        return BlobInfo(key, len(data), modified)

    def open(self, key: str):
        if key not in self.blobs:
            raise NotFound(f"no blob memory://test/{key}")
        return io.BytesIO(self.blobs[key][0])

    def local_path(self, key: str):
        return None

    def url(self, key: str, expires: float):
        return None


def test_the_store_works_on_a_blob_store_without_files(root):
    memory = MemoryBlobStore()
    sm = StorageManager(root, 100, 10, blobs=memory)
    a = sm.store(make_png(1000), "alice", "cat.png")
    b = sm.store(make_png(1100), "alice")
    assert a.path is None and a.key == f"users/alice/cat-{a.id}.png" and a.key in memory.blobs
    assert [i.id for i in sm.list_images("alice")] == [b.id, a.id]
    with sm.open_image(sm.get_image(a.id)) as fh:
        assert fh.read() == make_png(1000)
    assert sm.get_image(a.key).id == a.id
    assert not (root / "images").exists()  # nothing written locally but the ledger

    # check: a blob the ledger does not know, a row whose blob is gone
    memory.blobs["users/bob/stray-77.png"] = (make_png(700), time.time())
    del memory.blobs[b.key]
    report = sm.check()
    assert sorted(p.kind for p in report.problems) == ["missing_file", "orphan_file"]
    assert not sm.check(fix=True).remaining
    assert sm.get_image(77).user_id == "bob" and sm.get_quota_status("bob")["user"]["used_bytes"] == 700
    assert sm.check().problems == []

    # delete and cleanup
    sm.delete_image(a.id)
    assert a.key not in memory.blobs
    report = sm.cleanup(older_than_days=0)
    assert report.deleted == ["memory://test/users/bob/stray-77.png"] and memory.blobs == {}
    assert sm.quota.global_status()["used_bytes"] == 0


def test_a_taken_key_gets_another_name_and_the_stray_blob_is_kept(root):
    memory = MemoryBlobStore()
    sm = StorageManager(root, 100, 10, blobs=memory)
    memory.blobs["users/alice/cat-1.png"] = (b"not abby's", 0.0)
    image = sm.store(make_png(1000), "alice", "cat.png")
    assert image.id == 1 and image.key != "users/alice/cat-1.png" and image.key.startswith("users/alice/cat-1-")
    assert memory.blobs["users/alice/cat-1.png"] == (b"not abby's", 0.0)


def test_a_failed_commit_leaves_neither_row_nor_blob(root, monkeypatch):
    memory = MemoryBlobStore()
    sm = StorageManager(root, 100, 10, blobs=memory)

    def insert_fails(*args, **kwargs):
        raise StorageError("the ledger is gone")

    from abbycli.storage import sqlite

    monkeypatch.setattr(sqlite._Writer, "insert_image", insert_fails)
    with pytest.raises(StorageError):
        sm.store(make_png(1000), "alice")
    monkeypatch.undo()
    assert memory.blobs == {} and sm.list_images() == []
