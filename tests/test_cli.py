"""The real `abby` entry point end to end, in subprocesses, with --config and a temp root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from abbycli.cli.app import app
from conftest import MIB, make_png, run_abby, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\nmax_user_storage_mb = 1\n'
                                                "max_global_storage_mb = 2\nimage_generation_size_mb = 0.5\n"
                                                "[cli]\ndefault_user = \"alice\"\n")


@pytest.fixture
def pngs(tmp_path):
    paths = []
    for i, size in enumerate([300_000, 300_000, 300_000, 600_000]):
        path = tmp_path / f"pic{i}.png"
        path.write_bytes(make_png(size, (i, i, i)))
        paths.append(path)
    return paths


def abby(cfg, *args, **kw):
    return run_abby("--config", str(cfg), *args, **kw)


def one_line_error(result, code):
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("abby: error: ") and result.stderr.count("\n") == 1, result.stderr


def test_admin_commands_work_on_an_empty_store(cfg):
    for args in (["quota"], ["quota", "--json"], ["list"], ["cleanup"], ["check"], ["quota", "--user", "bob"]):
        result = abby(cfg, *args)
        assert result.returncode == 0, (args, result.stderr)
    data = json.loads(abby(cfg, "quota", "--json").stdout)
    assert data["users"] == [] and data["global"]["used_bytes"] == 0 and data["global"]["total_mb"] == 2.0


def test_save_list_quota_delete_round_trip(cfg, pngs, tmp_path):
    saved = abby(cfg, "save", str(pngs[0]), str(pngs[1]), "--json")
    assert saved.returncode == 0, saved.stderr
    images = json.loads(saved.stdout)["stored"]
    assert [Path(i["path"]).parent for i in images] == [tmp_path / "store" / "images" / "users" / "alice"] * 2
    abby(cfg, "save", str(pngs[2]), "--user", "Bob")

    listed = json.loads(abby(cfg, "list", "--json").stdout)
    assert [i["user_id"] for i in listed] == ["Bob", "alice", "alice"]
    assert json.loads(abby(cfg, "list", "--user", "alice", "--json").stdout)[0]["id"] == images[1]["id"]

    quota = json.loads(abby(cfg, "quota", "--json").stdout)
    assert quota["global"]["used_bytes"] == 900_000
    assert [(u["user_id"], u["used_bytes"], u["files"]) for u in quota["users"]] == [("alice", 600_000, 2),
                                                                                     ("Bob", 300_000, 1)]
    assert {"user_id", "used_bytes", "used_mb", "files"} <= set(quota["users"][0])
    one = json.loads(abby(cfg, "quota", "--user", "alice", "--json").stdout)
    assert one["user"]["used_bytes"] == 600_000 and one["user"]["limit_mb"] == 1.0
    assert one["daily"]["remaining"] == 5

    table = abby(cfg, "quota")
    assert "alice" in table.stdout and "Bob" in table.stdout and "\x1b[" not in table.stdout  # plain when piped
    top = json.loads(abby(cfg, "quota", "--json", "--top", "1").stdout)
    assert [u["user_id"] for u in top["users"]] == ["alice"] and top["user_count"] == 2

    deleted = abby(cfg, "delete", str(images[0]["id"]), images[1]["path"])
    assert deleted.returncode == 0, deleted.stderr
    assert not Path(images[0]["path"]).exists() and not Path(images[1]["path"]).exists()
    assert json.loads(abby(cfg, "quota", "--user", "alice", "--json").stdout)["user"]["used_bytes"] == 0
    missing = abby(cfg, "delete", "424242")
    assert missing.returncode == 1 and "no stored image" in missing.stderr


def test_quota_refusal_exits_3_with_one_line(cfg, pngs):
    assert abby(cfg, "save", str(pngs[3])).returncode == 0
    refused = abby(cfg, "save", str(pngs[3]))
    one_line_error(refused, 3)
    assert "storage limit" in refused.stderr


def test_bad_input_exits_2(cfg, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    one_line_error(abby(cfg, "save", str(text)), 2)
    one_line_error(abby(cfg, "save", str(tmp_path / "missing.png")), 2)
    one_line_error(abby(cfg, "quota", "--user", "../etc"), 2)
    usage = abby(cfg, "quota", "--top", "0")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    nouser = run_abby("--root", str(tmp_path / "r"), "save", str(text))
    one_line_error(nouser, 2)
    assert "--user" in nouser.stderr


def test_abby_debug_shows_the_traceback(cfg, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    result = abby(cfg, "save", str(text), env={"ABBY_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_quota_check_follows_the_nagios_convention(cfg, pngs, tmp_path):
    ok = abby(cfg, "quota", "--check")
    assert ok.returncode == 0 and ok.stdout.startswith("ABBY QUOTA OK")
    for p in pngs[:3]:
        abby(cfg, "save", str(p))  # 900 kB of alice's 1 MiB: WARNING for her
    warn = abby(cfg, "quota", "--check", "--user", "alice")
    assert warn.returncode == 1 and warn.stdout.startswith("ABBY QUOTA WARNING") and "|" in warn.stdout
    assert abby(cfg, "quota", "--check").returncode == 0  # globally still fine
    for name, size in [("a", MIB), ("b", MIB - 900_000)]:
        img = tmp_path / f"{name}.png"
        img.write_bytes(make_png(size))
        assert abby(cfg, "save", str(img), "--user", name).returncode == 0
    full = abby(cfg, "quota", "--check")
    assert full.returncode == 2 and full.stdout.startswith("ABBY QUOTA FULL")


def test_cleanup_dry_run_lists_exactly_what_the_real_run_deletes(cfg, pngs, tmp_path):
    for p in pngs[:3]:
        abby(cfg, "save", str(p))
    dry = json.loads(abby(cfg, "cleanup", "--older-than", "0", "--dry-run", "--json").stdout)
    assert dry["deleted_files"] == 3 and all(Path(f).exists() for f in dry["files"])
    real = json.loads(abby(cfg, "cleanup", "--older-than", "0", "--json").stdout)
    assert real["files"] == dry["files"] and real["freed_bytes"] == dry["freed_bytes"] == 900_000
    assert not any(Path(f).exists() for f in dry["files"])
    quiet = abby(cfg, "cleanup", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_check_exit_codes(cfg, pngs, tmp_path):
    abby(cfg, "save", str(pngs[0]))
    assert abby(cfg, "check").returncode == 0
    stray = tmp_path / "store" / "images" / "users" / "alice" / "copied-in.png"
    stray.write_bytes(make_png(1000))
    found = abby(cfg, "check")
    assert found.returncode == 1 and "orphan_file" in found.stdout
    fixed = abby(cfg, "check", "--fix", "--json")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["consistent"] is True
    assert json.loads(abby(cfg, "quota", "--user", "alice", "--json").stdout)["user"]["used_bytes"] == 301_000


def test_env_overrides_reach_the_commands(cfg, pngs):
    result = abby(cfg, "quota", "--json", env={"MAX_GLOBAL_STORAGE_MB": "7"})
    assert json.loads(result.stdout)["global"]["total_mb"] == 7.0


def test_every_command_has_help_text():
    runner = CliRunner()
    commands = ["quota", "list", "save", "delete", "cleanup", "check", "config", "config path", "config show",
                "config init", "config set"]
    for command in commands:
        result = runner.invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, command
        assert "Usage:" in result.output
    top = runner.invoke(app, ["--help"]).output
    for command in ("quota", "list", "save", "delete", "cleanup", "check", "config"):
        assert command in top


def test_version():
    result = run_abby("--version")
    assert result.returncode == 0 and result.stdout.startswith("abby ")


def test_importing_the_core_pulls_in_no_cli_or_heavy_library():
    code = ("import sys, abbycli; from abbycli import StorageManager, QuotaManager, ImageGenerator, load_settings; "
            "from abbycli.pipeline import generate; "
            "print([m for m in ('typer', 'rich', 'click', 'httpx', 'PIL', 'stamina') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_core_modules_never_import_cli_libraries():
    for path in (REPO / "abbycli").rglob("*.py"):
        if "cli" in path.relative_to(REPO / "abbycli").parts[:1]:
            continue
        text = path.read_text(encoding="utf-8")
        for lib in ("typer", "rich", "click"):
            assert f"import {lib}" not in text and f"from {lib}" not in text, path


def test_the_readme_documents_every_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for command in ("generate", "img2img", "upscale", "info", "balance", "quota", "list", "save", "delete", "cleanup",
                    "check", "config path", "config show", "config init", "config set", "history", "stats",
                    "schedule install", "schedule show", "schedule remove"):
        assert f"abby {command}" in readme, command
    assert "python -m pytest -q" in readme and "python -m pytest -q" in (REPO / ".ci" / "run").read_text()
