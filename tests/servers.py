"""The PostgreSQL and S3 test servers of `.ci/servers`, as pytest fixtures.

tests/conftest.py makes the fixtures global with one line:

    from servers import postgres_url, s3_store_env, test_servers  # noqa: F401

Where the servers come from, in order:
1. the ABBY_TEST_* variables `.ci/servers start` prints (CI exports them);
2. else, on Linux as root with PostgreSQL and SeaweedFS installed, `.ci/servers start`
   run once for this test session into a temp folder, and stopped when Python exits;
3. else the tests that need them skip, saying how to start them.
They must be on loopback: a test never reaches anything else.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "servers"
VARS = ("ABBY_TEST_POSTGRES_URL", "ABBY_TEST_S3_ENDPOINT", "ABBY_TEST_S3_BUCKET", "ABBY_TEST_S3_REGION",
        "ABBY_TEST_S3_ACCESS_KEY_ID", "ABBY_TEST_S3_SECRET_ACCESS_KEY")
HOW = ("start them with `bash .ci/servers start` (Linux; installs what is missing) and export the "
       "ABBY_TEST_POSTGRES_URL and ABBY_TEST_S3_* variables it prints: set -a; . /tmp/abby-test-servers/env; set +a")

# Taken when pytest imports this module, before any test's fixtures point HOME and the
# XDG folders at temp dirs: the servers' binaries are cached under the real ones.
_ENV_AT_START = dict(os.environ)

_found: dict[str, str] | None = None
_missing: str | None = None


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=2):
            return True
    except OSError:
        return False


def _from_environment() -> dict[str, str] | None:
    facts = {var: _ENV_AT_START[var] for var in VARS if _ENV_AT_START.get(var)}
    if not facts:
        return None
    missing = [var for var in VARS if var not in facts]
    if missing:
        pytest.fail(f"the test servers' variables are incomplete (missing {', '.join(missing)}); {HOW}")
    for var in ("ABBY_TEST_POSTGRES_URL", "ABBY_TEST_S3_ENDPOINT"):
        if not _loopback(facts[var]):
            pytest.fail(f"{var} is not on loopback; the tests only ever use 127.0.0.1")
        if not _answers(facts[var]):
            pytest.fail(f"{var} is set but nothing answers there; {HOW}, or unset the ABBY_TEST_* variables")
    return facts


def _start_for_session() -> dict[str, str] | str:
    """The facts of servers started for this session, or why they could not be."""
    if sys.platform != "linux":
        return "the PostgreSQL and S3 test servers run on Linux only"
    if os.geteuid() != 0:
        return f"no test servers (only root starts them for a test run); {HOW}"
    folder = tempfile.mkdtemp(prefix="abby-test-servers-")
    env = dict(_ENV_AT_START, ABBY_SERVERS_NO_INSTALL="1")  # never a download in the middle of a test run
    done = subprocess.run(["bash", str(SCRIPT), "start", folder], capture_output=True, text=True, env=env,
                          timeout=120)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no test servers ({why.removeprefix('servers: ')}); {HOW}"
    atexit.register(subprocess.run, ["bash", str(SCRIPT), "stop", folder], env=env, capture_output=True,
                    timeout=120)
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("ABBY_TEST_"))


@pytest.fixture(scope="session")
def test_servers() -> dict[str, str]:
    """The ABBY_TEST_* facts of running servers; skips when there are none."""
    global _found, _missing
    if os.name == "nt":
        pytest.skip("the PostgreSQL and S3 test servers run on Linux only")
    if _found is None and _missing is None:
        result = _from_environment() or _start_for_session()
        _found, _missing = (result, None) if isinstance(result, dict) else (None, result)
    if _missing:
        pytest.skip(_missing)
    return _found


@pytest.fixture(scope="session")
def postgres_url(test_servers) -> str:
    """postgresql://postgres@127.0.0.1:PORT/postgres of a throwaway cluster (fsync off)."""
    return test_servers["ABBY_TEST_POSTGRES_URL"]


@pytest.fixture
def s3_store_env(test_servers) -> dict[str, str]:
    """The variables that point abby at the test bucket, under a prefix of this test's own."""
    pytest.importorskip("obstore", reason="the S3 image store needs obstore: pip install '.[test]'")
    return {
        "ABBY_BLOBS_URL": f"s3://{test_servers['ABBY_TEST_S3_BUCKET']}/t-{uuid.uuid4().hex[:12]}",
        "AWS_ENDPOINT_URL_S3": test_servers["ABBY_TEST_S3_ENDPOINT"],
        "AWS_REGION": test_servers["ABBY_TEST_S3_REGION"],
        "AWS_ACCESS_KEY_ID": test_servers["ABBY_TEST_S3_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": test_servers["ABBY_TEST_S3_SECRET_ACCESS_KEY"],
    }
