"""`abby schedule`: the exact commands and files for each target, with the OS boundary stubbed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from abbycli import schedule
from abbycli.errors import AbbyError, InvalidInput


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
    assert "OnCalendar=*-*-* 02:15:00" in result.stdout and f"--config {cfg}" in result.stdout
    assert not (tmp_path / "xdg" / "systemd").exists()
    bad = run_abby("--config", str(cfg), "schedule", "install", "--at", "25:00", "--print")
    assert bad.returncode == 2 and "HH:MM" in bad.stderr
