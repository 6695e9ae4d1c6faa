"""Shared fixtures. The autouse fixture keeps every test away from the real
user config and data dirs, and from abby settings in the caller's environment."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import postgres_url, s3_store_env, test_servers  # noqa: F401  (the PostgreSQL/S3 test servers)

ABBY_ENV = [
    "ABBY_CONFIG", "ABBY_DEBUG", "STORAGE_ROOT", "MAX_GLOBAL_STORAGE_MB", "MAX_USER_STORAGE_MB",
    "MAX_USER_DAILY_GENS", "STORAGE_CLEANUP_DAYS", "IMAGE_GEN_SIZE_MB", "STABILITY_API_KEY", "STABILITY_API_HOST",
    "ABBY_PROVIDER", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
    "A1111_API_HOST", "A1111_USERNAME", "A1111_PASSWORD", "COMFY_API_KEY", "COMFYUI_API_HOST",
    "ABBY_LEDGER_URL", "ABBY_BLOBS_URL",
]


# Where the autouse fixture points every per-user and machine-wide folder, as
# (environment variable, sub-folder of the test's temp home). platformdirs reads
# XDG_* on Linux and (when set) on macOS, HOME otherwise on macOS. On Windows it
# asks the Known Folders API and ignores APPDATA & co.; only its WIN_PD_OVERRIDE_*
# variables (platformdirs >= 4.8) redirect it. APPDATA/LOCALAPPDATA/PROGRAMDATA
# and USERPROFILE (Path.home() on Windows) are set too, for everything else the
# tests start.
ISOLATED_DIRS = [
    ("HOME", ""), ("USERPROFILE", ""),
    ("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state"),
    ("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_DIRS", "site"), ("XDG_DATA_DIRS", "site-data"),
    ("APPDATA", "appdata"), ("LOCALAPPDATA", "localappdata"), ("PROGRAMDATA", "programdata"),
    ("WIN_PD_OVERRIDE_APPDATA", "appdata"), ("WIN_PD_OVERRIDE_LOCAL_APPDATA", "localappdata"),
    ("WIN_PD_OVERRIDE_COMMON_APPDATA", "programdata"),
]


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    for var in ABBY_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, sub in ISOLATED_DIRS:
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("NO_COLOR", "1")
    yield home


def make_png(size: int = 1000, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real PNG, padded after IEND to exactly ``size`` bytes (readers ignore the tail)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    data = buf.getvalue()
    assert size >= len(data), f"a PNG needs at least {len(data)} bytes"
    return data + b"\0" * (size - len(data))


def make_image(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(buf, fmt)
    return buf.getvalue()


MIB = 1024 * 1024


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def storage(root):
    from abbycli import StorageManager

    sm = StorageManager(root, max_global_storage_mb=10, max_user_storage_mb=2, max_user_daily_gens=3, cleanup_days=7,
                        image_generation_size_mb=0.5)
    yield sm
    sm.close()


def run_abby(*args: str, env: dict | None = None, cwd: Path | None = None, input: str | None = None):
    """Run the real entry point in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "abbycli", *args], capture_output=True, text=True, env=full_env, cwd=cwd,
        input=input, timeout=120,
    )


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def interruptible() -> dict:
    """Popen arguments that give a child Ctrl-C's default meaning even when this test run was
    started in the background (a shell's `cmd &` ignores SIGINT, and children inherit that)."""
    if os.name != "posix":
        return {}
    import signal

    return {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The waits retries ask for, recorded instead of slept."""
    waits: list[float] = []
    import asyncio

    real_sleep = asyncio.sleep

    async def fake_sleep(seconds, *a):
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return waits
