"""The suite must never read or write the real user's or machine's abby folders.

tests/conftest.py redirects them per test. On Windows platformdirs ignores
APPDATA/LOCALAPPDATA and asks the Known Folders, so a fixture that only sets
those variables let the suite write abby.toml and Logs\\abby.log into the
developer's real %LOCALAPPDATA%\\abby. These tests pin the redirection on the
OS they run on, in this process and in the child processes the CLI tests start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from abbycli import config

PLACES = ("user_config_path", "default_root", "default_log_file", "site_config_path")

# What a child process (like `python -m abbycli` in the CLI tests) computes.
CHILD = ("import json; from abbycli import config; "
         f"print(json.dumps({{name: str(getattr(config, name)()) for name in {PLACES!r}}}))")


def assert_inside(paths: dict[str, Path], home: Path) -> None:
    home = home.resolve()
    outside = {name: str(p) for name, p in paths.items() if not Path(p).resolve().is_relative_to(home)}
    assert not outside, f"abby's folders are not under the test's temp home {home}: {outside}"


def test_abby_folders_are_under_the_test_temp_dir(isolated_dirs):
    assert_inside({name: getattr(config, name)() for name in PLACES}, isolated_dirs)


def test_child_processes_see_the_same_isolation(isolated_dirs):
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    assert_inside({name: Path(p) for name, p in json.loads(out.stdout).items()}, isolated_dirs)
