"""`abby schedule`: the exact commands and files for each target, with the OS boundary stubbed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from abbycli import schedule
from abbycli.config import load_settings
from abbycli.errors import AbbyError, ConfigError, InvalidInput
from conftest import write_config


class FakeOS:
    """Stands in for crontab, schtasks and systemctl; keeps a crontab in memory."""

    def __init__(self, crontab: str | None = None):
        self.crontab = crontab
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, args, stdin=None):
        args = list(args)
        self.calls.append((args, stdin))
        if args == ["crontab", "-l"]:
            if self.crontab is None:
                return schedule.Result(1, "", "no crontab for bot\n")
            return schedule.Result(0, self.crontab, "")
        if args == ["crontab", "-"]:
            self.crontab = stdin
        if args[:2] == ["schtasks", "/Query"]:
            return schedule.Result(0, "TaskName: \\abby-cleanup\nNext Run Time: 03:30\n", "")
        return schedule.Result(0, "", "")


EXISTING = "MAILTO=admin@example.org\n# backups\n0 2 * * * /usr/local/bin/backup --all\n"
COMMAND = ["/opt/my tools/abby", "--config", "/etc/abby/abby.toml", "cleanup", "--quiet"]


def test_cron_install_replace_remove_cycle_keeps_other_lines():
    fake = FakeOS(EXISTING)
    schedule.execute(schedule.install_plan("cron", COMMAND, "03:30", fake), fake)
    line = "30 3 * * * '/opt/my tools/abby' --config /etc/abby/abby.toml cleanup --quiet " + schedule.CRON_MARK
    assert fake.crontab == EXISTING + line + "\n"
    schedule.execute(schedule.install_plan("cron", COMMAND, "4:05", fake), fake)  # again: replaced, not added
    assert fake.crontab.count(schedule.CRON_MARK) == 1 and fake.crontab.startswith(EXISTING)
    assert "5 4 * * * " in fake.crontab
    assert schedule.show("cron", fake).startswith("5 4 * * * ")
    schedule.execute(schedule.remove_plan("cron", fake), fake)
    assert fake.crontab == EXISTING
    assert schedule.show("cron", fake) == ""
    plan = schedule.remove_plan("cron", fake)  # nothing left: removing again does nothing
    assert plan.commands == [] and "nothing to remove" in plan.summary


def test_cron_install_without_any_crontab_and_percent_escaping():
    fake = FakeOS(None)
    command = ["/usr/bin/abby", "--root", "/srv/100%/shared", "cleanup", "--quiet"]
    schedule.execute(schedule.install_plan("cron", command, "00:00", fake), fake)
    assert fake.crontab == f"0 0 * * * /usr/bin/abby --root /srv/100\\%/shared cleanup --quiet {schedule.CRON_MARK}\n"
    assert [c[0] for c in fake.calls] == [["crontab", "-l"], ["crontab", "-"]]


def test_schtasks_command_quotes_paths_with_spaces():
    fake = FakeOS()
    command = [r"C:\Program Files\abby\abby.exe", "--config", r"C:\abby data\abby.toml", "cleanup", "--quiet"]
    plan = schedule.install_plan("schtasks", command, "03:30", fake)
    assert plan.commands == [([
        "schtasks", "/Create", "/SC", "DAILY", "/TN", "abby-cleanup", "/ST", "03:30", "/TR",
        r'"C:\Program Files\abby\abby.exe" --config "C:\abby data\abby.toml" cleanup --quiet', "/F"], None)]
    # Passed as one argument, Windows' own quoting turns it into /TR "\"C:\Program Files\...\" ..."
    line = subprocess.list2cmdline(plan.commands[0][0])
    assert r'/TR "\"C:\Program Files\abby\abby.exe\" --config \"C:\abby data\abby.toml\" cleanup --quiet"' in line
    schedule.execute(plan, fake)
    assert fake.calls[-1][0][:2] == ["schtasks", "/Create"]
    assert "abby-cleanup" in schedule.show("schtasks", fake)
    removal = schedule.remove_plan("schtasks", fake)
    assert removal.commands == [(["schtasks", "/Delete", "/TN", "abby-cleanup", "/F"], None)]


def test_systemd_writes_a_service_and_timer_then_enables_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    fake = FakeOS()
    schedule.execute(schedule.install_plan("systemd", COMMAND, "03:30", fake), fake)
    folder = tmp_path / "systemd" / "user"
    service = (folder / "abby-cleanup.service").read_text()
    timer = (folder / "abby-cleanup.timer").read_text()
    assert 'ExecStart="/opt/my tools/abby" --config /etc/abby/abby.toml cleanup --quiet\n' in service
    assert "Type=oneshot" in service
    assert "OnCalendar=*-*-* 03:30:00\n" in timer and "Persistent=true" in timer and "WantedBy=timers.target" in timer
    assert [c[0] for c in fake.calls] == [["systemctl", "--user", "daemon-reload"],
                                          ["systemctl", "--user", "enable", "--now", "abby-cleanup.timer"]]
    fake.calls.clear()
    schedule.execute(schedule.remove_plan("systemd", fake), fake)
    assert ["systemctl", "--user", "disable", "--now", "abby-cleanup.timer"] in [c[0] for c in fake.calls]
    assert not (folder / "abby-cleanup.service").exists() and not (folder / "abby-cleanup.timer").exists()


def test_systemd_quoting():
    assert schedule.systemd_quote("/usr/bin/abby") == "/usr/bin/abby"
    assert schedule.systemd_quote("/a b/c") == '"/a b/c"'
    assert schedule.systemd_quote('say "hi"') == '"say \\"hi\\""'
    assert schedule.systemd_quote("100%") == "100%%"


@pytest.mark.parametrize("at", ["3", "24:00", "12:60", "noon", "1:2"])
def test_bad_times_are_refused(at):
    with pytest.raises(InvalidInput):
        schedule.parse_time(at)


def test_a_failing_scheduler_is_reported():
    def broken(args, stdin=None):
        return schedule.Result(1, "", "Access is denied.")

    with pytest.raises(AbbyError, match="Access is denied"):
        schedule.execute(schedule.install_plan("schtasks", COMMAND, "03:30", broken), broken)


def test_the_command_uses_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["relative/python-thing"])
    cmd = schedule.abby_command(Path("abby.toml"), None)
    assert cmd[1:3] == ["-m", "abbycli"] and Path(cmd[0]).is_absolute()
    assert Path(cmd[cmd.index("--config") + 1]).is_absolute() and cmd[-2:] == ["cleanup", "--quiet"]


def test_print_changes_nothing(tmp_path):
    from conftest import run_abby, write_config

    cfg = write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\n')
    result = run_abby("--config", str(cfg), "schedule", "install", "--target", "systemd", "--at", "02:15", "--print",
                      env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert result.returncode == 0, result.stderr
    # systemd_quote, not the bare path: a Windows temp path (C:\\...) is quoted with doubled backslashes
    assert "OnCalendar=*-*-* 02:15:00" in result.stdout and f"--config {schedule.systemd_quote(str(cfg))}" in result.stdout
    assert not (tmp_path / "xdg" / "systemd").exists()
    bad = run_abby("--config", str(cfg), "schedule", "install", "--at", "25:00", "--print")
    assert bad.returncode == 2 and "HH:MM" in bad.stderr


# --- the job carries what it would not otherwise see ---------------------------------------------

def job_settings(tmp_path, env, text="[storage]\ncleanup_days = 3\n", overrides=None):
    cfg = write_config(tmp_path / "abby.toml", text)
    return cfg, load_settings(cfg, overrides, env=env)


def test_root_and_age_from_the_environment_are_carried_into_the_job(tmp_path):
    cfg, settings = job_settings(tmp_path, {"STORAGE_ROOT": str(tmp_path / "x"), "STORAGE_CLEANUP_DAYS": "1"})
    command, left_out = schedule.job_command(settings, environ={})
    assert command[command.index("--config") + 1] == str(cfg.resolve())
    assert command[command.index("--root") + 1] == str((tmp_path / "x").resolve())
    assert command[-4:] == ["cleanup", "--quiet", "--older-than", "1"] and left_out == []


def test_settings_from_the_file_or_defaults_are_left_to_the_file(tmp_path):
    _, settings = job_settings(tmp_path, {}, '[storage]\nroot = "store"\ncleanup_days = 3\n')
    command, _ = schedule.job_command(settings, environ={})
    assert "--root" not in command and "--older-than" not in command and "--log-file" not in command
    assert command[-2:] == ["cleanup", "--quiet"]


def test_flags_are_carried(tmp_path):
    _, settings = job_settings(tmp_path, {}, overrides={"storage.root": str(tmp_path / "r"),
                                                        "cli.log_file": str(tmp_path / "l.log")})
    command, _ = schedule.job_command(settings, environ={})
    assert command[command.index("--root") + 1] == str((tmp_path / "r").resolve())
    assert command[command.index("--log-file") + 1] == str((tmp_path / "l.log").resolve())


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="only Linux derives the default dirs from XDG_*")
def test_a_default_root_that_follows_an_xdg_variable_is_carried(tmp_path, isolated_dirs):
    _, settings = job_settings(tmp_path, {})
    command, _ = schedule.job_command(settings, environ={"XDG_DATA_HOME": str(isolated_dirs / "data")})
    assert command[command.index("--root") + 1] == str(settings.storage.root.resolve())
    command, _ = schedule.job_command(settings, environ={})
    assert "--root" not in command


def test_settings_cleanup_does_not_use_are_named_not_carried(tmp_path):
    _, settings = job_settings(tmp_path, {"MAX_USER_DAILY_GENS": "9", "STABILITY_API_KEY": "sk-secret-1"})
    command, left_out = schedule.job_command(settings, environ={})
    assert left_out == ["MAX_USER_DAILY_GENS (storage.max_user_daily_gens)",
                        "STABILITY_API_KEY (generation.api_key)"]
    assert not any("sk-secret" in a or "9" == a for a in command)


def test_a_config_that_only_loads_thanks_to_the_environment_is_refused(tmp_path):
    _, settings = job_settings(tmp_path, {"MAX_GLOBAL_STORAGE_MB": "10000"}, "[storage]\nmax_user_storage_mb = 6000\n")
    with pytest.raises(ConfigError) as err:
        schedule.job_command(settings, environ={})
    message = str(err.value)
    assert message.startswith("the scheduled job would not see MAX_GLOBAL_STORAGE_MB")
    assert "storage.max_user_storage_mb (6000" in message and "\n" not in message


def test_the_job_line_for_each_target(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    command = ["/opt/ab by/abby", "--config", "/etc/a$b/abby.toml", "--root", "/srv/100%/it's", "cleanup", "--quiet",
               "--older-than", "1.5"]
    fake = FakeOS(None)
    schedule.execute(schedule.install_plan("cron", command, "03:30", fake), fake)
    # cron hands the line after the time fields to /bin/sh, after turning \% into %
    line = fake.crontab.splitlines()[0]
    assert line == ("30 3 * * * '/opt/ab by/abby' --config '/etc/a$b/abby.toml' --root '/srv/100\\%/it'\"'\"'s' "
                    "cleanup --quiet --older-than 1.5 " + schedule.CRON_MARK)
    shell_text = line[len("30 3 * * * "):-len(schedule.CRON_MARK)].replace("\\%", "%")
    assert shlex.split(shell_text) == command

    service, _ = schedule.systemd_units(command, 3, 30)
    assert ('ExecStart="/opt/ab by/abby" --config "/etc/a$$b/abby.toml" --root "/srv/100%%/it\'s" '
            "cleanup --quiet --older-than 1.5\n") in service

    win = [r"C:\Program Files\abby\abby.exe", "--config", r"C:\abby data\abby.toml", "--root", r"D:\store 1",
           "cleanup", "--quiet", "--older-than", "1.5"]
    tr = schedule.install_plan("schtasks", win, "03:30", fake).commands[0][0][9]
    assert tr == (r'"C:\Program Files\abby\abby.exe" --config "C:\abby data\abby.toml" --root "D:\store 1" '
                  r"cleanup --quiet --older-than 1.5")


def test_systemd_doubles_dollar_signs():
    assert schedule.systemd_quote("/srv/$HOME") == '"/srv/$$HOME"'
    assert schedule.systemd_quote("/srv/${X}y") == '"/srv/$${X}y"'


@pytest.mark.parametrize("target", schedule.TARGETS)
def test_a_path_with_a_line_break_cannot_be_scheduled(target):
    with pytest.raises(InvalidInput, match="line break"):
        schedule.install_plan(target, ["/usr/bin/abby", "--root", "/srv/a\nb", "cleanup", "--quiet"], "03:30", FakeOS())


def test_schtasks_refuses_a_command_longer_than_it_takes():
    long = [r"C:\a" + "\\x" * 130 + r"\abby.exe", "cleanup", "--quiet"]
    with pytest.raises(InvalidInput, match="at most 261"):
        schedule.install_plan("schtasks", long, "03:30", FakeOS())


def test_schedule_install_as_a_user_carries_the_environment(tmp_path):
    from conftest import run_abby

    cfg = write_config(tmp_path / "abby.toml", "[storage]\ncleanup_days = 3\n")
    root = tmp_path / "x"
    result = run_abby("--config", str(cfg), "schedule", "install", "--target", "systemd", "--print",
                      env={"STORAGE_ROOT": str(root), "STORAGE_CLEANUP_DAYS": "1", "MAX_USER_DAILY_GENS": "9",
                           "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert result.returncode == 0, result.stderr
    assert f"--root {schedule.systemd_quote(str(root.resolve()))} " in result.stdout
    assert "cleanup --quiet --older-than 1\n" in result.stdout
    assert "the job does not get MAX_USER_DAILY_GENS" in result.stderr

    # the job, run without this shell's variables, cleans the same root with the same age
    command, _ = schedule.job_command(load_settings(cfg, env={"STORAGE_ROOT": str(root), "STORAGE_CLEANUP_DAYS": "1"}),
                                      environ={})
    job_env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_ROOT", "STORAGE_CLEANUP_DAYS")}
    done = subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (root / ".abby").is_dir()


def test_the_command_keeps_a_venv_interpreter(monkeypatch, tmp_path):
    base = tmp_path / "base-python"
    base.write_text("")
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    try:
        venv_python.symlink_to(base)
    except OSError:
        pytest.skip("this system cannot make symlinks (Windows without developer mode)")
    monkeypatch.setattr("sys.argv", ["-c"])
    monkeypatch.setattr("sys.executable", str(venv_python))
    assert schedule.abby_command(None, None)[:3] == [str(venv_python), "-m", "abbycli"]


def test_a_store_chosen_by_the_shell_environment_is_never_scheduled_half(tmp_path):
    """A scheduler runs the job without this shell's variables: a ledger or image store chosen
    by them would be another store for the nightly job, and S3 credentials from AWS_* would be
    missing. Both are refused at install time, naming what to put in the config file."""
    from abbycli.errors import ConfigError

    cfg = write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\n')
    settings = load_settings(cfg, env={"ABBY_LEDGER_URL": "postgresql://abby:pw@db:5432/abby"})
    with pytest.raises(ConfigError, match="would not see ABBY_LEDGER_URL .* and would clean another store") as err:
        schedule.job_command(settings, environ={})
    assert "pw" not in str(err.value)
    s3 = write_config(tmp_path / "s3.toml", '[storage]\nroot = "store"\nblobs_url = "s3://bucket/p"\n')
    with pytest.raises(ConfigError, match="would not see this shell's AWS_\\* variables"):
        schedule.job_command(load_settings(s3, env={}), environ={})
    good = write_config(tmp_path / "good.toml", '[storage]\nroot = "store"\nblobs_url = "s3://bucket/p"\n'
                        's3_access_key_id = "AKIDEXAMPLE"\ns3_secret_access_key = "s3cr3t"\n'
                        'ledger_url = "postgresql://abby:pw@db:5432/abby"\n')
    command, _ = schedule.job_command(load_settings(good, env={}), environ={})
    assert "s3cr3t" not in " ".join(command) and "pw@" not in " ".join(command)
