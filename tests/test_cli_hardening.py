"""The CLI's hardening (issues 8 and 9): save's reading, per-file results, output in any
encoding, the log file, interrupts, and how new core reports are shown."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from abbycli.cli import logfile
from abbycli.cli.app import app
from abbycli.errors import FileInUse
from abbycli.storage.manager import CheckReport, CleanupReport, Problem, StorageManager
from conftest import MIB, interruptible, make_image, make_png, run_abby, write_config

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX devices, pipes and resource limits")


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\nmax_user_storage_mb = 1\n'
                                                "max_global_storage_mb = 2\nimage_generation_size_mb = 0.5\n"
                                                "[cli]\ndefault_user = \"alice\"\n")


def abby(cfg, *args, **kw):
    return run_abby("--config", str(cfg), *args, **kw)


def abby_limited(cfg, *args):
    """The real CLI with its address space capped, so a run that reads a huge file dies
    of MemoryError instead of taking the machine's memory."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1024 * MIB, 1024 * MIB))

    return subprocess.run([sys.executable, "-m", "abbycli", "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=60, preexec_fn=limit)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
    return stderr.splitlines()


# --- B2: save checks the file before reading it --------------------------------------------------

@POSIX
def test_save_refuses_devices_pipes_and_folders_without_reading(cfg, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    result = abby_limited(cfg, "save", "/dev/zero", str(fifo), str(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 3 and all("not a regular file" in l or "folder" in l for l in lines), lines
    assert not (tmp_path / "store" / "images" / "users" / "alice").exists()


@POSIX
def test_save_checks_the_size_before_reading(cfg, tmp_path):
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as fh:
        fh.truncate(2048 * MIB)  # 2 GiB that take no disk; reading them would take 2 GiB of memory
    result = abby_limited(cfg, "save", str(sparse))
    assert result.returncode == 3, result.stderr
    assert error_lines(result.stderr) == [
        f"abby: error: {sparse}: the image is 2.0 GiB, more than the whole per-user limit of 1.0 MiB"]


def test_save_reads_at_most_one_byte_over_the_cap(tmp_path, monkeypatch):
    """A file that grows after its size was checked is cut at cap + 1 bytes and refused."""
    from abbycli.cli import files
    from abbycli.errors import UserQuotaExceeded

    path = tmp_path / "growing.png"
    path.write_bytes(make_png(5000))
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 10, *real_fstat(fd)[7:])))
    def too_big(size):
        return UserQuotaExceeded(f"{size} bytes")

    with pytest.raises(UserQuotaExceeded, match="1001 bytes"):  # cap + 1 read, no more
        files.read_bounded(path, 1000, too_big)
    monkeypatch.undo()
    assert files.read_bounded(path, 5000, too_big) == path.read_bytes()


# --- B4: every file is tried and reported ---------------------------------------------------------

def test_save_tries_every_file_and_reports_each(cfg, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.jpg"
    first.write_bytes(make_png(1000))
    second.write_bytes(make_image("JPEG"))
    text = tmp_path / "text.png"
    text.write_text("not an image")
    result = abby(cfg, "save", str(first), str(text), str(second), "--json")
    assert result.returncode == 2, result.stderr
    data = json.loads(result.stdout)
    assert [Path(i["path"]).suffix for i in data["stored"]] == [".png", ".jpg"]
    assert [(f["file"], f["exit_code"]) for f in data["failed"]] == [(str(text), 2)]
    listed = json.loads(abby(cfg, "list", "--json").stdout)
    assert len(listed) == 2

    plain = abby(cfg, "save", str(tmp_path / "missing.png"), str(first), str(text))
    assert plain.returncode == 2  # the first failure's code
    assert plain.stdout.count("stored ") == 1
    assert len(error_lines(plain.stderr)) == 2


# --- issue 9: output in any encoding -------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_every_command_works_redirected_in_any_encoding(cfg, tmp_path, encoding):
    from abbycli import history

    picture = tmp_path / "p.png"
    picture.write_bytes(make_png(1000))
    env = {"PYTHONIOENCODING": encoding}
    saved = abby(cfg, "save", str(picture), "--user", "山田", "--json", env=env)
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout)["stored"][0]["user_id"] == "山田"
    storage = StorageManager(tmp_path / "store", 2, 1, image_generation_size_mb=0.5)
    history.record(storage, [{"at": time.time(), "user_id": "山田", "operation": "text-to-image",
                              "prompt": "a cat 🐱 in Kyōto", "outcome": "success"}])
    storage.close()

    runs = [["quota"], ["quota", "--user", "山田"], ["list"], ["history"], ["stats"], ["check"],
            ["quota", "--json"], ["list", "--json"], ["history", "--json"], ["stats", "--json"]]
    for args in runs:
        result = subprocess.run([sys.executable, "-m", "abbycli", "--config", str(cfg), *args], capture_output=True,
                                env={**os.environ, **env}, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        text = result.stdout.decode(encoding)  # strict: every byte is in the code page
        if "--json" in args:
            data = json.loads(text)
            assert "山田" in json.dumps(data, ensure_ascii=False), args
            if args[0] == "history":
                assert data[0]["prompt"] == "a cat 🐱 in Kyōto"
        else:
            assert "unexpected" not in result.stderr.decode(encoding, "replace"), args


def test_bars_fall_back_to_ascii_when_the_encoding_cannot_show_them(cfg, tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(make_png(900_000))
    abby(cfg, "save", str(picture))
    result = abby(cfg, "quota", env={"PYTHONIOENCODING": "cp1252"})
    assert result.returncode == 0, result.stderr
    assert "########--" in result.stdout and "█" not in result.stdout and "?" not in result.stdout


# --- units: percentages are rounded down -----------------------------------------------------------

def test_quota_never_shows_100_percent_for_a_store_that_is_not_full(cfg, tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(make_png(MIB - 100))  # 99.99 % of alice's 1 MiB
    assert abby(cfg, "save", str(picture)).returncode == 0
    for args in (["quota"], ["quota", "--user", "alice"]):
        out = abby(cfg, *args).stdout
        assert "100.0" not in out and "99.9" in out, out


# --- D3: the log file -------------------------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt" or not os.path.exists("/dev/full"),
                    reason="needs /dev/full, a POSIX device (Windows has none)")
def test_an_unwritable_log_warns_once_and_the_command_goes_on(cfg):
    result = abby(cfg, "--log-file", "/dev/full", "cleanup")
    assert result.returncode == 0 and "Deleted 0 image(s)" in result.stdout
    assert "Logging error" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "abby: warning: cannot write the log file /dev/full: No space left on device; continuing without it"]


def test_log_setup_is_idempotent(tmp_path):
    path, other = tmp_path / "a.log", tmp_path / "b.log"
    logfile.setup(path, "cleanup")
    logfile.setup(path, "cleanup")
    logfile.log().info("once")
    logfile.setup(other, "check")
    logfile.log().info("elsewhere")
    for handler in logging.getLogger("abby").handlers:
        handler.flush()
    assert path.read_text().count("once") == 1 and "elsewhere" not in path.read_text()
    assert "elsewhere" in other.read_text() and "once" not in other.read_text()


def test_a_broken_config_of_a_logged_command_is_logged(tmp_path):
    bad = write_config(tmp_path / "bad.toml", "[storage]\nmax_user_storage_mb = -1\n")
    log = tmp_path / "logs" / "abby.log"
    result = run_abby("--config", str(bad), "--log-file", str(log), "cleanup")
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1
    assert "ERROR abby cleanup:" in log.read_text() and "max_user_storage_mb" in log.read_text()


def test_an_unexpected_error_is_logged_with_its_traceback_redacted(tmp_path, monkeypatch):
    key = "sk-abcdefghijklmnop0123456789"
    cfg = write_config(tmp_path / "abby.toml", f"[storage]\nroot = '{tmp_path / 'store'}'\n"
                                               f'[generation]\napi_key = "{key}"\n')
    log = tmp_path / "abby.log"

    def broken(self, *args, **kwargs):
        raise ValueError(f"a bug that quotes {key}")

    monkeypatch.setattr(StorageManager, "cleanup", broken)
    result = CliRunner().invoke(app, ["--config", str(cfg), "--log-file", str(log), "cleanup"])
    assert result.exit_code == 1
    assert "unexpected ValueError" in result.output and key not in result.output
    text = log.read_text()
    assert "Traceback" in text and "in broken" in text
    assert "unexpected ValueError" in text and key not in text and "********" in text


# --- D5: Ctrl-C ----------------------------------------------------------------------------------

@POSIX
def test_ctrl_c_during_a_command_is_one_line_exit_130_and_logged(cfg, tmp_path):
    from filelock import FileLock

    (tmp_path / "store" / ".abby").mkdir(parents=True)
    log = tmp_path / "abby.log"
    with FileLock(tmp_path / "store" / ".abby" / "maintenance.lock"):  # the cleanup will wait for it
        proc = subprocess.Popen([sys.executable, "-m", "abbycli", "--config", str(cfg), "--log-file", str(log),
                                 "cleanup"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **interruptible())
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err == "abby: error: interrupted\n"
    assert "WARNING abby cleanup: interrupted" in log.read_text()


@POSIX
def test_ctrl_c_after_the_command_finished_is_not_a_traceback(cfg, tmp_path):
    """Python's shutdown (atexit, module teardown) dies of a Ctrl-C: exit -2, or a
    KeyboardInterrupt report. Once the command is over its own exit code stands."""
    script = tmp_path / "slow_exit.py"
    script.write_text("import atexit, sys, time\n"
                      "atexit.register(time.sleep, 5)\n"
                      "atexit.register(lambda: print('exiting', file=sys.stderr, flush=True))\n"
                      "from abbycli.cli.app import main\n"
                      "main()\n")
    proc = subprocess.Popen([sys.executable, str(script), "--config", str(cfg), "quota", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **interruptible())
    assert proc.stderr.readline() == "exiting\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and json.loads(out)["users"] == []
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err


# --- new core report fields ------------------------------------------------------------------------

def test_cleanup_shows_files_in_use_as_kept_not_deleted(cfg, monkeypatch):
    from datetime import datetime, timezone

    def cleanup(self, *args, **kwargs):
        report = CleanupReport(False, datetime.now(timezone.utc), deleted=["/s/a.png"], freed_bytes=1000)
        report.kept = ["/s/held.png"]  # the core keeps their rows; they are not in deleted
        return report

    monkeypatch.setattr(StorageManager, "cleanup", cleanup)
    result = CliRunner().invoke(app, ["--config", str(cfg), "cleanup"])
    assert result.exit_code == 0
    assert "Deleted 1 image(s) (1000 B)" in result.output
    assert "1 in use, kept; the next run retries" in result.output
    assert "/s/held.png" in result.output


def test_delete_of_a_file_in_use_is_a_per_item_error(cfg, tmp_path, monkeypatch):
    def delete_image(self, ref):
        raise FileInUse(f"{ref} is open in another program; it was kept")

    monkeypatch.setattr(StorageManager, "delete_image", delete_image)
    result = CliRunner().invoke(app, ["--config", str(cfg), "delete", "7", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["failed"] == [
        {"ref": "7", "error": "7 is open in another program; it was kept", "exit_code": 1}]


def test_check_shows_problems_fix_cannot_repair_and_fails_while_they_remain(cfg, monkeypatch):
    def check(self, fix=False, **kwargs):
        return CheckReport(fix, [Problem("not_an_image", "/s/users/alice/notes.png", "not an image; left alone"),
                                 Problem("over_quota", "alice", "2.0 MiB of 1.0 MiB after adoption")], 3)

    monkeypatch.setattr(StorageManager, "check", check)
    for args in (["check"], ["check", "--fix"]):
        result = CliRunner().invoke(app, ["--config", str(cfg), *args])
        assert result.exit_code == 1
        assert "not_an_image: /s/users/alice/notes.png" in result.output and "over_quota: alice" in result.output
        assert "--fix" not in result.output  # --fix cannot repair either


@pytest.mark.skipif(os.name == "nt", reason="Windows has no /dev/zero or named pipes")
def test_generation_inputs_are_refused_before_reading_a_device(cfg, tmp_path):
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    for source in ("/dev/zero", str(fifo), str(tmp_path)):
        result = abby_limited(cfg, "upscale", source, "--mode", "local")
        assert result.returncode == 2, result.stderr
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and ("regular file" in lines[0] or "folder" in lines[0]), lines
