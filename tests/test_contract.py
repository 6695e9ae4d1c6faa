"""The storage contract, written once and run on every backend combination
(sqlite-local, postgres-local, postgres-s3; see backends.py).

In one process: the facade's calls, the limits refusing exactly at the cap, the
reservations, cleanup, check and check --fix, metadata, ids. Across real processes:
simulated hosts (a host name and, on S3, a local root of their own each; one ledger,
one bucket) racing on tight limits, and processes SIGKILLed in the middle of saves.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from abbycli import DailyLimitReached, GlobalQuotaExceeded, NotFound, UserQuotaExceeded
from abbycli.storage.maintenance import where
from backends import backend, limits_mb  # noqa: F401  (the fixture)
from conftest import make_png

KIB = 1024
WORKER = Path(__file__).with_name("contract_worker.py")
# 16 KiB per user, 40 KiB in all, 3 generations a day holding 4 KiB each.
TIGHT = limits_mb(user=16 * KIB, total=40 * KIB, daily=3, generation=4 * KIB)


def assert_consistent(backend, sm) -> None:
    """The ledger accounts for exactly the blobs the store lists, and its totals are exact."""
    assert backend.rows(sm) == backend.listing(sm)
    with sm.ledger.read() as tx:
        assert tx.audit_totals().ok


# --- the facade ----------------------------------------------------------------------------------

def test_store_list_get_open_delete(backend):
    sm = backend(**TIGHT)
    a = sm.store(make_png(1000), "alice", "cat.png", metadata={"seed": 7})
    b = sm.store(make_png(1200, (0, 90, 0)), "alice", "dog.png")
    c = sm.store(make_png(900), "bob", "owl.png")
    assert a.id < b.id < c.id
    assert a.key == f"users/alice/cat-{a.id}.png" and (a.size, a.format) == (1000, "png")
    assert (a.path is None) == (backend.kind == "postgres-s3")
    assert [i.id for i in sm.list_images("alice")] == [b.id, a.id]
    assert [i.id for i in sm.list_images()] == [c.id, b.id, a.id]
    assert [i.id for i in sm.list_images(limit=1)] == [c.id]
    assert sm.get_image(a.id) == a and sm.get_image(a.key) == a
    with sm.open_image(b) as fh:
        assert fh.read() == make_png(1200, (0, 90, 0))
    ok, message, path = asyncio.run(sm.save_image(make_png(800), "carol", "fox.png"))
    assert ok and "saved fox-" in message and (path is None) == (backend.kind == "postgres-s3")

    other = backend("host1", **TIGHT)  # another process, on another host: the same store
    assert other.get_image(b.id) == b
    assert other.delete_image(a.id) == a
    with pytest.raises(NotFound):
        sm.get_image(a.id)
    with pytest.raises(NotFound):
        sm.delete_image(a.id)
    assert sm.blobs.stat(a.key) is None
    assert sm.get_quota_status("alice")["user"]["used_bytes"] == 1200
    assert sorted(backend.listing(sm).values()) == [800, 900, 1200]
    assert_consistent(backend, sm)
    assert sm.check().problems == []


def test_image_url_where_the_store_has_them(backend):
    import httpx

    sm = backend(**TIGHT)
    image = sm.store(make_png(700), "alice")
    url = sm.image_url(image, expires=60)
    if backend.kind != "postgres-s3":
        assert url is None and sm.where(image) == str(image.path)
        return
    assert httpx.get(url, timeout=10).content == make_png(700)  # presigned: no credentials needed
    assert sm.where(image) == f"{sm.blobs.describe()}/{image.key}"


def test_metadata_round_trip(backend):
    meta = {"prompt": "un chat 🐈 — «façade»\nligne 2", "seed": 2**63 - 1, "cfg": 7.5,
            "nested": {"list": [1, 2.5, None, True, "x"], "empty": {}}, "quote": "it's \"fine\""}
    sm = backend(**TIGHT)
    a = sm.store(make_png(500), "alice", metadata=meta)
    bare = sm.store(make_png(500), "alice")
    assert sm.get_image(a.id).metadata == meta == a.metadata
    assert [i.metadata for i in backend("host1", **TIGHT).list_images("alice")] == [{}, meta]
    assert bare.metadata == {}


def test_ids_are_never_handed_out_twice(backend):
    sm = backend(**TIGHT)
    a = sm.store(make_png(500), "alice")
    b = sm.store(make_png(500), "alice")
    sm.delete_image(b.id)  # the newest id is gone ...
    c = sm.store(make_png(500), "alice")
    assert c.id > b.id  # ... and not handed out again
    d = backend("host1", **TIGHT).store(make_png(500), "bob")
    assert d.id > c.id
    sm.cleanup(older_than_days=0)
    assert sm.list_images() == []
    assert sm.store(make_png(500), "bob").id > d.id > a.id


# --- limits ----------------------------------------------------------------------------------------

def test_the_user_cap_refuses_exactly_past_the_limit(backend):
    sm = backend(**TIGHT)
    sm.store(make_png(10_000), "alice")
    with pytest.raises(UserQuotaExceeded) as refused:
        sm.store(make_png(16 * KIB - 10_000 + 1), "alice")  # one byte too many
    assert str(refused.value) == ("user 'alice' is at their storage limit: 9.8 KiB of 16.0 KiB used, "
                                  "6.2 KiB more needed")
    sm.store(make_png(16 * KIB - 10_000), "alice")  # exactly the cap
    user = sm.get_quota_status("alice")["user"]
    assert (user["used_bytes"], user["limit_bytes"], user["percentage"], user["status"]) == (
        16 * KIB, 16 * KIB, 100.0, "FULL")
    with pytest.raises(UserQuotaExceeded, match="at their storage limit: 16.0 KiB of 16.0 KiB used"):
        backend("host1", **TIGHT).store(make_png(100), "alice")
    with pytest.raises(UserQuotaExceeded) as refused:
        sm.store(make_png(16 * KIB + 1), "bob")
    assert str(refused.value) == ("the image is 16.0 KiB (16,385 bytes), more than the whole per-user limit "
                                  "of 16.0 KiB (16,384 bytes)")
    sm.store(make_png(100), "bob")  # other users are not affected
    assert len(backend.listing(sm)) == 3  # the refused saves left nothing behind
    assert_consistent(backend, sm)


def test_the_global_cap_refuses_exactly_past_the_limit(backend):
    sm = backend(**TIGHT)
    sm.store(make_png(16 * KIB), "alice")
    backend("host1", **TIGHT).store(make_png(16 * KIB), "bob")
    with pytest.raises(GlobalQuotaExceeded) as refused:
        sm.store(make_png(8 * KIB + 1), "carol")
    assert str(refused.value) == "the shared storage is full: 32.0 KiB of 40.0 KiB used, 8.0 KiB more needed"
    sm.store(make_png(8 * KIB), "carol")
    status = sm.get_quota_status("carol")["global"]
    assert (status["used_bytes"], status["status"]) == (40 * KIB, "FULL")
    with pytest.raises(GlobalQuotaExceeded, match="the shared storage is full: 40.0 KiB of 40.0 KiB used, 100 B"):
        sm.store(make_png(100), "dave")
    # Room held by a generation counts against the global cap as well.
    sm.delete_image(sm.list_images("carol")[0].id)
    held = sm.quota.reserve_generation("carol")
    with pytest.raises(GlobalQuotaExceeded):
        sm.store(make_png(4 * KIB + 1), "dave")
    sm.quota.refund(held)
    sm.store(make_png(4 * KIB + 1), "dave")
    assert_consistent(backend, sm)


def test_the_daily_limit_counts_every_host(backend):
    sm, other = backend(**TIGHT), backend("host1", **TIGHT)
    sm.quota.reserve_generation("alice")
    other.quota.reserve_generations("alice", 2)
    with pytest.raises(DailyLimitReached) as refused:
        sm.quota.reserve_generation("alice")
    assert str(refused.value).startswith("user 'alice' has reached the daily limit: this generation needs one "
                                         "but 0 of 3 are left today, 3 still running; the limit resets at ")
    # Three held generations hold 12 KiB of alice's 16: a 5 KiB save does not fit beside them.
    with pytest.raises(UserQuotaExceeded, match=r"12\.0 KiB of 16\.0 KiB used"):
        sm.store(make_png(5 * KIB), "alice")
    # A batch is reserved whole or not at all.
    with pytest.raises(DailyLimitReached, match="4 generations were asked for but 3 of 3 are left today"):
        sm.quota.reserve_generations("bob", 4)
    assert sm.get_quota_status("bob")["daily"] | {"resets_at": None} == {
        "allowed": True, "remaining": 3, "limit": 3, "used": 0, "in_progress": 0, "resets_at": None}
    assert len(set(r.id for r in other.quota.reserve_generations("bob", 3))) == 3
    with sm.ledger.read() as tx:
        assert tx.audit_totals().ok and tx.totals().reserved == 6 * 4 * KIB


# --- reservations ------------------------------------------------------------------------------------

def test_reserve_confirm_refund_and_settling_twice(backend):
    sm, other = backend(**TIGHT), backend("host1", **TIGHT)
    q = sm.quota
    held = q.reserve_generation("alice")
    status = sm.get_quota_status("alice")
    assert (status["daily"]["in_progress"], status["daily"]["remaining"]) == (1, 2)
    assert status["user"]["reserved_bytes"] == status["global"]["reserved_bytes"] == 4 * KIB

    sm.store(make_png(3000), "alice", reservation=held)  # the image replaces its reservation
    for settle_again in (q.confirm, q.refund, other.quota.confirm, other.quota.refund):
        settle_again(held)  # already settled: nothing changes
    status = sm.get_quota_status("alice")
    assert (status["daily"]["used"], status["daily"]["in_progress"], status["daily"]["remaining"]) == (1, 0, 2)
    assert (status["user"]["used_bytes"], status["user"]["reserved_bytes"]) == (3000, 0)
    with sm.ledger.write() as tx:
        assert q.settle(tx, held, charge=True) is False

    refunded = q.reserve_generation("alice")
    other.quota.refund(refunded)  # settled from another host
    q.confirm(refunded)
    assert sm.get_quota_status("alice")["daily"]["used"] == 1
    q.confirm(q.reserve_generation("alice"))
    assert sm.get_quota_status("alice")["daily"]["used"] == 2

    # A settled reservation cannot store another image for free: it takes a new slot ...
    sm.store(make_png(500), "alice", reservation=held)
    assert sm.get_quota_status("alice")["daily"]["used"] == 3
    # ... while there is one.
    with pytest.raises(DailyLimitReached):
        sm.store(make_png(500), "alice", reservation=held)
    assert sm.get_quota_status("alice")["user"]["used_bytes"] == 3500
    assert_consistent(backend, sm)


# --- cleanup -------------------------------------------------------------------------------------------

def test_cleanup_by_age_per_user_and_dry_run_equals_the_real_run(backend):
    sm = backend(**TIGHT)
    old = [sm.store(make_png(1000), "alice"), sm.store(make_png(1100), "bob"), sm.store(make_png(1200), "alice")]
    time.sleep(0.02)
    new = sm.store(make_png(1300), "alice")
    cutoff = (old[-1].created_at.timestamp() + new.created_at.timestamp()) / 2
    now = cutoff + 86400  # a day later: the old ones are older than a day, the new one is not

    def paths(images):
        return sorted(sm.where(i) for i in images)

    dry = sm.cleanup(older_than_days=1, user_id="alice", dry_run=True, now=now)
    assert sorted(dry.deleted) == paths([old[0], old[2]]) and dry.freed_bytes == 2200
    assert len(backend.listing(sm)) == 4  # a dry run changes nothing
    real = sm.cleanup(older_than_days=1, user_id="alice", now=now)
    assert sorted(real.deleted) == sorted(dry.deleted) and real.freed_bytes == dry.freed_bytes
    assert real.empty_dirs == dry.empty_dirs == []  # alice still has her new image
    assert [i.id for i in sm.list_images()] == [new.id, old[1].id]

    dry = backend("host1", **TIGHT).cleanup(older_than_days=1, dry_run=True, now=now)
    real = sm.cleanup(older_than_days=1, now=now)
    assert sorted(real.deleted) == sorted(dry.deleted) == paths([old[1]])
    assert real.empty_dirs == dry.empty_dirs
    assert real.empty_dirs == ([] if backend.kind == "postgres-s3" else [str(sm.blobs.images / "users" / "bob")])
    assert [i.id for i in sm.list_images()] == [new.id]
    assert sm.cleanup(now=now).deleted == []  # 7 days by default: the new one stays
    assert sm.get_quota_status("bob")["user"]["used_bytes"] == 0
    assert_consistent(backend, sm)


def test_cleanup_finishes_a_delete_interrupted_half_way(backend):
    sm = backend(**TIGHT)
    before, after = sm.store(make_png(1000), "alice"), sm.store(make_png(2000), "alice")
    keep = sm.store(make_png(3000), "bob")
    # Two deletes that died: one before its blob went, one after.
    with sm.ledger.write() as tx:
        pending = tx.begin_delete(ids=[before.id, after.id], limit=2)
    assert len(pending) == 2
    sm.blobs.delete([after.key])
    assert sm.list_images("alice") == []
    assert sm.get_quota_status("alice")["user"]["used_bytes"] == 3000  # still counted

    report = sm.check(now=time.time() + 120)  # interrupted for two minutes
    assert sorted(p.kind for p in report.problems) == ["interrupted_delete"] * 2
    dry = sm.cleanup(dry_run=True)
    real = backend("host1", **TIGHT).cleanup()
    assert sorted(real.deleted) == sorted(dry.deleted) == sorted([sm.where(before), sm.where(after)])
    assert real.freed_bytes == dry.freed_bytes == 3000
    assert sm.blobs.stat(before.key) is None and sm.blobs.stat(keep.key) is not None
    assert sm.get_quota_status("alice")["user"]["used_bytes"] == 0
    assert sm.check().problems == []
    assert_consistent(backend, sm)


# --- check and check --fix --------------------------------------------------------------------------------

def test_check_finds_and_fix_repairs_every_drift(backend):
    sm = backend(**TIGHT)
    sm.store(make_png(1000), "alice")  # one image that stays consistent
    gone = sm.store(make_png(1000), "alice")
    grown = sm.store(make_png(1000), "bob")
    sm.blobs.delete([gone.key])  # a blob lost behind abby's back
    sm.blobs.delete([grown.key])  # a blob replaced by a bigger one
    sm.blobs.commit(sm.blobs.stage(make_png(1500)), grown.key)
    stray = "users/carol/stray-9000.png"  # a blob the ledger never knew (a crashed save's)
    sm.blobs.commit(sm.blobs.stage(make_png(700)), stray)
    backend.sql(sm, "UPDATE totals SET bytes = bytes + 5")  # the kept totals drift
    with sm.ledger.write() as tx:  # a reservation abandoned long ago
        tx.reserve("dave", "2000-01-01", 100, 1, 999_999_999, "gone-host", 0)

    report = sm.check()
    found = sorted((p.kind, p.path) for p in report.problems)
    assert found == sorted([("missing_file", sm.where(gone)), ("size_mismatch", sm.where(grown)),
                            ("orphan_file", where(sm.blobs, stray)),
                            ("stale_reservation", "dave"), ("totals", sm.ledger.describe())])
    assert report.remaining == report.problems and not any(p.fixed for p in report.problems)

    fixed = backend("host1", **TIGHT).check(fix=True)
    assert fixed.remaining == [] and len(fixed.problems) == 5
    assert sm.check().problems == []
    with sm.ledger.read() as tx:
        assert tx.audit_totals().ok and tx.reservations() == []
    assert sm.get_quota_status("bob")["user"]["used_bytes"] == 1500
    assert sm.get_quota_status("carol")["global"]["used_bytes"] == 1000 + 1500 + 700
    adopted = sm.get_image(9000)  # the id its name carries
    assert (adopted.user_id, adopted.key, adopted.size) == ("carol", stray, 700)
    assert sm.store(make_png(500), "carol").id > 9000  # and later ids go past it
    assert_consistent(backend, sm)


def test_an_adopted_blob_never_takes_an_id_handed_out_before(backend):
    sm = backend(**TIGHT)
    first = sm.store(make_png(500), "alice")
    # A save killed after its blob was committed: its name carries the id it was about to get ...
    crashed = f"users/alice/generated-{first.id + 1}.png"
    sm.blobs.commit(sm.blobs.stage(make_png(600)), crashed)
    # ... which the next save got instead (under another name), and its user then deleted.
    taken = sm.store(make_png(700), "alice")
    assert taken.id == first.id + 1 and taken.key != crashed
    sm.delete_image(taken.id)
    assert [(p.kind, p.fixed) for p in sm.check(fix=True).problems] == [("orphan_file", True)]
    adopted = sm.get_image(crashed)
    assert adopted.id > taken.id  # a new id: the deleted image's id names nothing again
    with pytest.raises(NotFound):
        sm.get_image(taken.id)
    assert_consistent(backend, sm)


def test_check_never_reports_a_save_in_flight(backend):
    from concurrent.futures import ThreadPoolExecutor

    saver, checker = backend(**TIGHT), backend("host1", **TIGHT)
    placed, release = threading.Event(), threading.Event()
    commit = saver.blobs.commit

    def slow_commit(staged, key):
        commit(staged, key)
        placed.set()
        release.wait(30)  # the blob is in place; its row is not committed yet

    saver.blobs.commit = slow_commit
    with ThreadPoolExecutor(2) as pool:
        saving = pool.submit(saver.store, make_png(600), "alice")
        try:
            assert placed.wait(30)
            checking = pool.submit(checker.check)
            time.sleep(0.3)  # the check sees the blob, and must wait for its save to settle
        finally:
            release.set()
        saving.result(30)
        assert checking.result(60).problems == []
    assert_consistent(backend, checker)


def test_check_leaves_a_blob_that_is_not_an_image_alone(backend):
    sm = backend(**TIGHT)
    sm.store(make_png(1000), "alice")
    sm.blobs.commit(sm.blobs.stage(b"not an image at all"), "users/alice/notes-77.png")
    report = sm.check(fix=True)
    assert [(p.kind, p.fixed) for p in report.problems] == [("not_an_image", False)]
    assert sm.blobs.stat("users/alice/notes-77.png") is not None  # never deleted for the admin
    with pytest.raises(NotFound):
        sm.get_image(77)


# --- across processes and hosts ---------------------------------------------------------------------------

def start_workers(backend, jobs: list[dict]) -> list[subprocess.Popen]:
    """Start one worker per job; returns once every one is ready."""
    procs = []
    for job in jobs:
        p = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        p.stdin.write(json.dumps({"store": backend.description(job["host"]), **job}) + "\n")
        p.stdin.flush()
        procs.append(p)
    for p in procs:
        line = p.stdout.readline()
        assert line.strip() == "ready", p.communicate(timeout=60)[1]
    return procs


def go(procs) -> None:
    for p in procs:  # all at once: they race from here
        p.stdin.write("go\n")
        p.stdin.flush()


def hosts_for(backend) -> list[str]:
    """Two simulated hosts where the ledger can be shared between machines; one on SQLite."""
    return ["host0", "host1"] if backend.shared_ledger else ["host0"]


SIZE = 4 * KIB
# Four images per user, ten in all, two generations a day: three users contend for every limit.
# (Simulated over random interleavings of these seeds' operations, every limit is reached
# every time; with three a day, the store sometimes filled before any user's day did.)
RACE = limits_mb(user=4 * SIZE, total=10 * SIZE, daily=2, generation=SIZE)
USERS = ["u0", "u1", "u2"]


def test_hosts_racing_on_tight_limits_never_exceed_them(backend):
    jobs = [{"host": host, "action": "race", "limits": RACE, "users": USERS, "ops": 16, "size": SIZE,
             "seed": n * 10 + i} for n, host in enumerate(hosts_for(backend)) for i in range(3)]
    procs = start_workers(backend, jobs)
    go(procs)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    stored = {key: size for r in results for key, size, _ in r["stored"]}
    assert len(stored) == sum(len(r["stored"]) for r in results)  # no key handed out twice
    refused = sum((Counter(r["refused"]) for r in results), Counter())
    # Every limit was reached, so the race was really run on all three.
    assert set(refused) == {"UserQuotaExceeded", "GlobalQuotaExceeded", "DailyLimitReached"}, refused

    sm = backend(**RACE)
    day = sm.quota.today()
    with sm.ledger.read() as tx:
        totals, audit = tx.totals(), tx.audit_totals()
        usage = {u: tx.usage(u) for u in USERS}
        daily = {u: tx.daily_taken(u, day) for u in USERS}
        assert tx.reservations() == []
    assert audit.ok
    assert totals.bytes <= 10 * SIZE and totals.reserved == 0
    assert all(u.bytes <= 4 * SIZE for u in usage.values()), usage
    assert all(used <= 2 and held == 0 for used, held in daily.values()), daily
    # Every counter is exactly what the processes did.
    assert totals.bytes == sum(stored.values()) and totals.files == len(stored)
    for user in USERS:
        assert usage[user].bytes == sum(size for r in results for _, size, u in r["stored"] if u == user)
        assert daily[user][0] == sum(r["slots"].get(user, 0) for r in results)
    assert backend.rows(sm) == backend.listing(sm) == stored  # the ledger is the bucket
    assert sm.check().problems == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL at random moments: Linux only")
def test_processes_killed_during_saves_leave_no_row_without_its_blob(backend, monkeypatch):
    import socket

    limits = limits_mb(user=400 * SIZE, total=1000 * SIZE, daily=1_000_000, generation=SIZE)
    hosts = hosts_for(backend)
    per_host = 2 if len(hosts) > 1 else 3
    jobs = [{"host": host, "action": "forever", "limits": limits, "users": USERS, "size": SIZE, "seed": n * 10 + i}
            for n, host in enumerate(hosts) for i in range(per_host)]
    # One save per host killed at the worst moment, deterministically: its blob is committed,
    # its row (and the settling of its reservation) is not.
    jobs += [{"host": host, "action": "commit-then-die", "limits": limits, "users": [f"held-{host}"],
              "size": SIZE} for host in hosts]
    procs = start_workers(backend, jobs)
    go(procs)
    rng = random.Random(2024)
    for p in procs[:len(procs) - len(hosts)]:
        assert p.stdout.read(1) == ".", p.communicate(timeout=60)[1]  # it has saved: now at a random moment
        time.sleep(rng.random() * 0.2)
        p.kill()
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL

    sm = backend(**limits)
    rows, listing = backend.rows(sm), backend.listing(sm)
    assert rows, "no save committed before the kills; the test proves nothing"
    assert all(listing.get(key) == size for key, size in rows.items())  # no row without its whole blob
    for key in listing:
        assert sm.blobs.read(key) == make_png(SIZE), f"partial or corrupt blob {key}"
    orphans = set(listing) - set(rows)
    assert len(orphans) >= len(hosts)

    report = sm.check(fix=True)
    assert {p.kind for p in report.problems} >= {"orphan_file"} and report.remaining == []
    with sm.ledger.read() as tx:
        assert tx.audit_totals().ok
        held = {(r.user_id, r.host) for r in tx.reservations()}
    assert {(f"held-{host}", host) for host in hosts} <= held  # another host's: not this one's to judge
    assert backend.rows(sm) == backend.listing(sm)
    assert sm.check().problems == []

    # Each host reclaims the reservations of its own dead processes, and only those.
    for host in hosts:
        monkeypatch.setattr(socket, "gethostname", lambda: host)
        reclaimed = sm.check(fix=True).problems
        assert {p.path for p in reclaimed} >= {f"held-{host}"} and {p.kind for p in reclaimed} == {
            "stale_reservation"}
        with sm.ledger.read() as tx:
            assert all(r.host != host for r in tx.reservations())
    monkeypatch.undo()
    status = sm.get_quota_status("held-host0")
    assert status["daily"]["in_progress"] == 0 and status["global"]["reserved_bytes"] == 0
    with sm.ledger.read() as tx:
        assert tx.audit_totals().ok
    assert sm.check().problems == []


def test_a_host_with_another_image_store_is_refused_before_it_writes(backend, tmp_path):
    """A host that forgot storage.blobs_url (or names another bucket) would write rows every
    other host sees as missing files, and their check --fix would drop them."""
    from abbycli import StorageManager
    from abbycli.errors import ConfigError
    from abbycli.storage.blobs import LocalBlobStore

    sm = backend("h1")
    sm.store(make_png(900), "alice", "a.png")
    stray = LocalBlobStore(tmp_path / "elsewhere")
    other = StorageManager(tmp_path / "elsewhere", ledger=sm.ledger, blobs=stray)
    if isinstance(sm.blobs, LocalBlobStore):  # the same kind of store: nothing to tell apart
        other.store(make_png(901), "alice", "b.png")
        return
    with pytest.raises(ConfigError, match="every host sharing a ledger must use the same storage.blobs_url"):
        other.store(make_png(901), "alice", "b.png")
    with pytest.raises(ConfigError):
        other.check(fix=True)
    assert [i.key for i in sm.list_images()] == ["users/alice/a-1.png"]


def test_check_never_reads_a_remote_object_larger_than_a_users_cap(backend):
    """On S3, reading a foreign multi-GB object under users/ would hold it in memory."""
    from abbycli.storage.blobs import LocalBlobStore

    sm = backend("h1", **TIGHT)
    if isinstance(sm.blobs, LocalBlobStore):
        pytest.skip("a local file is read from disk as a stream")
    staged = sm.blobs.stage(b"\x89PNG\r\n\x1a\n" + b"\0" * (32 * KIB))  # twice a user's whole cap
    sm.blobs.commit(staged, "users/alice/huge-77.png")
    opened = []
    real_open = sm.blobs.open
    sm.blobs.open = lambda key: opened.append(key) or real_open(key)
    report = sm.check(fix=True)
    assert [p.kind for p in report.problems] == ["not_an_image"] and "not read" in report.problems[0].detail
    assert opened == []
