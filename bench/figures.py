"""The six figures of the benchmark suite. Each returns rows for the results table."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from abbycli import StorageManager

from .data import build_store, png_bytes, restore_expired
from .timing import Pair, alternate, command, timed

ROOT_DIR = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    figure: str
    a: str
    b: str
    pair: Pair | None
    target: str
    limit: float | None  # the ratio must be <= this
    notes: list[str] = field(default_factory=list)
    value: float | None = None  # for rows that are not a plain A/B ratio
    rate: bool = False  # the medians are things per second, not seconds

    @property
    def ratio(self) -> float:
        return self.value if self.value is not None else self.pair.ratio

    @property
    def ok(self) -> bool | None:
        return None if self.limit is None else self.ratio <= self.limit


@dataclass
class Settings:
    quick: bool
    work: Path
    runs: int

    @property
    def saved_store(self) -> tuple[int, int]:
        return (2_000, 100) if self.quick else (20_000, 1_000)

    @property
    def big(self) -> int:
        return 20_000 if self.quick else 200_000


def abby_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "abbycli", *args]


# --- 1. the save path ----------------------------------------------------------------------

def save_path(s: Settings) -> list[Row]:
    import diskcache

    files, users = s.saved_store
    root = s.work / "save"
    sm = build_store(root, files, users, size=200)
    image = png_bytes(int(1.5 * 1024 * 1024))
    floor_dir = root / "images" / "users" / "floor"
    floor_dir.mkdir()
    counter = iter(range(10**9))

    def abby_save():
        sm.store(image, f"user{next(counter) % users}")

    def floor():
        n = next(counter)
        tmp = floor_dir / f".tmp-{n}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, image)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, floor_dir / f"floor-{n}.png")

    class FsyncDisk(diskcache.Disk):
        """diskcache with abby's durability: the value file and its folder are fsynced.
        Its SQLite already runs in WAL mode with synchronous=NORMAL, as abby's does."""

        def _write(self, full_path, iterator, mode, encoding=None):
            size = super()._write(full_path, iterator, mode, encoding)
            for path, flags in ((full_path, os.O_RDONLY), (os.path.dirname(full_path), os.O_RDONLY)):
                fd = os.open(path, flags)
                os.fsync(fd)
                os.close(fd)
            return size

    cache = diskcache.Cache(str(s.work / "diskcache"), disk=FsyncDisk, size_limit=2**50, cull_limit=0)
    for i in range(files):  # the same number of entries as abby's store
        cache.set(f"pre-{i}", png_bytes(200))

    def dc_set():
        cache.set(f"k{next(counter)}", image)

    runs = max(s.runs, 15)
    vs_floor = alternate(abby_save, floor, runs, warmup=3)
    vs_dc = alternate(abby_save, dc_set, runs, warmup=3)
    cache.close()
    sm.close()
    note = (f"store of {files:,} images over {users:,} users; 1.5 MiB PNG; both sides fsync the file "
            "(abby also fsyncs the folder)")
    decode = ("store() decodes every image before writing it (and checks a PNG's CRCs); this PNG is 16x16 "
              "pixels padded to 1.5 MiB, so the figure is the storage path alone. A real 1024x1024 PNG adds "
              "about 14 ms of decoding, measured apart: that is the price of never storing a broken image")
    return [
        Row("1. save_image vs floor", "abby store()", "temp write + fsync + os.replace", vs_floor, "≤ 1.3×", 1.3,
            [note, decode]),
        Row("1. save_image vs diskcache", "abby store()", "diskcache Cache.set (file and folder fsynced)", vs_dc,
            "≤ 1.0×", 1.0, ["diskcache gets abby's durability: its value file and folder are fsynced; "
                            "its SQLite is WAL + synchronous=NORMAL like abby's"]),
    ]


# --- 2. concurrency ----------------------------------------------------------------------------

def _worker(root: str, user: str, count: int, size: int, start_at: float, limits: dict, out) -> None:
    sm = StorageManager(root, **limits)
    data = png_bytes(size)
    while time.time() < start_at:
        time.sleep(0.001)
    ok = refused = 0
    from abbycli import QuotaExceeded

    for _ in range(count):
        try:
            sm.store(data, user)
            ok += 1
        except QuotaExceeded:
            refused += 1
    out.put((ok, refused))


def _throughput(root: Path, procs: int, per_proc: int, size: int, limits: dict) -> tuple[float, int, int]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.5
    workers = [ctx.Process(target=_worker, args=(str(root), f"u{i % 4}", per_proc, size, start_at, limits, out))
               for i in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    elapsed = time.time() - start_at
    return elapsed, sum(r[0] for r in results), sum(r[1] for r in results)


def concurrency(s: Settings) -> list[Row]:
    size = 256 * 1024
    total = 400 if s.quick else 1_600
    generous = {"max_global_storage_mb": 10**5, "max_user_storage_mb": 10**4}
    one, eight = [], []
    for run in range(max(3, s.runs // 2)):
        for procs, bucket in ((1, one), (8, eight)):
            root = s.work / f"conc-{procs}-{run}"
            elapsed, ok, _ = _throughput(root, procs, total // procs, size, generous)
            bucket.append(ok / elapsed)
            shutil.rmtree(root)
    pair = Pair(eight, one)
    # Tight limits: 8 processes race for room that only some of them can get.
    limits = {"max_global_storage_mb": 40, "max_user_storage_mb": 12}
    root = s.work / "conc-tight"
    _elapsed, ok, refused = _throughput(root, 8, 40, size, limits)
    sm = StorageManager(root, **limits)
    over = _bytes_over_limits(sm, root, limits)
    assert over == 0, f"{over} bytes over a limit"
    assert sm.check().problems == [], "ledger and disk disagree after the race"
    return [Row("2. 8 processes vs 1 (saves/s)", "8 processes, 4 users", "1 process", pair, "report (higher is better)",
                None, [f"{total} saves of 256 KiB each side; medians {pair.a_median:.0f} vs {pair.b_median:.0f} saves/s",
                       f"tight-limit race: {ok} stored, {refused} refused, 0 bytes over any limit (asserted), "
                       "check clean"], rate=True)]


def _bytes_over_limits(sm: StorageManager, root: Path, limits: dict) -> int:
    per_user: dict[str, int] = {}
    for path in (root / "images" / "users").rglob("*"):
        if path.is_file():
            per_user[path.parent.name] = per_user.get(path.parent.name, 0) + path.stat().st_size
    mib = 1024 * 1024
    over = sum(max(0, v - limits["max_user_storage_mb"] * mib) for v in per_user.values())
    return over + max(0, sum(per_user.values()) - limits["max_global_storage_mb"] * mib)


# --- 3. quota report and check ---------------------------------------------------------------

def quota_and_check(s: Settings, stores: dict[int, Path]) -> list[Row]:
    small, big = min(stores), max(stores)
    q_small = command(abby_cmd("--root", str(stores[small]), "quota", "--json"))
    q_big = command(abby_cmd("--root", str(stores[big]), "quota", "--json"))
    du_small = command(["du", "-sb", str(stores[small])])
    du_big = command(["du", "-sb", str(stores[big])])
    quota = alternate(q_big, q_small, s.runs, warmup=2)
    du = alternate(du_big, du_small, s.runs, warmup=2)
    check = alternate(command(abby_cmd("--root", str(stores[big]), "check", "--json")), du_big, s.runs, warmup=1)
    users = 1_000 if not s.quick else 100
    return [
        Row("3. abby quota --json growth", f"{big:,} files", f"{small:,} files", quota, "≤ 1.3×", 1.3,
            [f"{users:,} users in both; du -sb grows {du.ratio:.1f}× over the same stores "
             f"({du.b_median * 1000:.0f} → {du.a_median * 1000:.0f} ms)"]),
        Row("3. abby check (full reconcile)", f"abby check, {big:,} files", "du -sb, same store", check, "≤ 2×", 2.0),
    ]


# --- 4. cleanup --------------------------------------------------------------------------------------

def cleanup(s: Settings) -> list[Row]:
    files, expired, users = s.big, s.big // 4, 1_000 if not s.quick else 100
    root_a, root_b = s.work / "clean-abby", s.work / "clean-find"
    sm_a = build_store(root_a, files, users, expired=expired)
    sm_b = build_store(root_b, files, users, expired=expired)
    abby_run = command(abby_cmd("--root", str(root_a), "cleanup", "--older-than", "7", "--quiet"))
    find_run = command(["find", str(root_b / "images"), "-type", "f", "-mtime", "+7", "-delete"])
    first = {"a": True, "b": True}

    def restore_a():
        if not first["a"]:
            restore_expired(sm_a, root_a, expired, users)
        first["a"] = False

    def restore_b():
        if not first["b"]:
            restore_expired(sm_b, root_b, expired, users, ledger=False)
        first["b"] = False

    pair = alternate(abby_run, find_run, s.runs, warmup=1, before_a=restore_a, before_b=restore_b)
    left = sum(1 for _ in (root_a / "images").rglob("*.png"))
    assert left == files - expired, f"abby cleanup left {left} files, expected {files - expired}"
    sm_a.close()
    sm_b.close()
    return [Row("4. abby cleanup", f"abby cleanup ({expired:,} of {files:,} expired)",
                "find -type f -mtime +7 -delete, identical copy", pair, "≤ 1.2×", 1.2,
                ["abby's time includes its start-up and the ledger update; find's only the walk and unlinks"])]


# --- 5. start-up ---------------------------------------------------------------------------------------

FLOOR_APP = '''import typer

app = typer.Typer()


@app.command()
def first(count: int = 1) -> None:
    print(count)


@app.command()
def second(name: str = "x") -> None:
    print(name)


app()
'''


def startup(s: Settings) -> list[Row]:
    floor = s.work / "floor_app.py"
    floor.write_text(FLOOR_APP)
    empty = s.work / "empty-store"
    env = dict(os.environ)
    quota = alternate(command(abby_cmd("--root", str(empty), "quota", "--json"), env),
                      command([sys.executable, str(floor), "first", "--count", "2"], env), max(s.runs, 15), warmup=2)
    helps = alternate(command(abby_cmd("--help"), env), command([sys.executable, str(floor), "--help"], env),
                      max(s.runs, 15), warmup=2)
    code = ("import sys, abbycli; from abbycli import StorageManager, ImageGenerator; "
            "print([m for m in ('httpx', 'PIL', 'typer', 'rich') if m in sys.modules])")
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[]", f"import abbycli pulled in {heavy}"
    return [
        Row("5. start-up: abby quota --json (empty store)", "abby quota --json", "2-command Typer app, running a command",
            quota, "≤ 1.3×", 1.3, ["`import abbycli` (with StorageManager, ImageGenerator) loads none of httpx, "
                                   "PIL, typer, rich: asserted"]),
        Row("5. start-up: abby --help", "abby --help", "2-command Typer app --help", helps, "≤ 1.3×", 1.3),
    ]


# --- 6. generation fan-out -------------------------------------------------------------------------------

def fan_out(s: Settings) -> list[Row]:
    sys.path.insert(0, str(ROOT_DIR / "tests"))
    from fake_stability import FakeStability

    latency = 0.3
    server = FakeStability(api_key="sk-bench", latency=latency)
    url = server.start()
    root = s.work / "gen-store"
    env = dict(os.environ, STABILITY_API_KEY="sk-bench", STABILITY_API_HOST=url, MAX_USER_DAILY_GENS="100000")
    gen = command(abby_cmd("--root", str(root), "generate", "a lighthouse", "--user", "bench", "--count", "8",
                           "--concurrency", "4", "--json"), env)
    start = command(abby_cmd("--root", str(root), "quota", "--json"), env)
    walls, starts, conns = [], [], []
    gen()  # warm-up
    for _ in range(s.runs):
        before = server.connections
        walls.append(timed(gen))
        conns.append(server.connections - before)
        starts.append(timed(start))
    server.stop()
    import statistics

    start_up = statistics.median(starts)
    bound = 2 * latency + start_up
    row = Row("6. generate --count 8 --concurrency 4", "wall time", f"2 × {latency * 1000:.0f} ms + start-up",
              Pair(walls, [bound] * len(walls)), "≤ 1.3×", 1.3,
              [f"loopback fake server adding {latency * 1000:.0f} ms per request; start-up (abby quota --json) "
               f"{start_up * 1000:.0f} ms; TCP connections per run: {sorted(set(conns))} for 8 requests"])
    return [row]
