"""Installing the nightly `abby cleanup --quiet` with the system's own scheduler.

Three targets: cron (the user's crontab), schtasks (Windows Task Scheduler)
and systemd (a user service and timer). Everything that touches the system
goes through a ``Runner`` (run a command) and plain file writes, so tests
check the exact commands and files with the OS boundary stubbed; the text
transformations themselves (the crontab edit, the unit files, quoting) are
pure functions.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .errors import AbbyError, ConfigError, InvalidInput

TASK_NAME = "abby-cleanup"
CRON_MARK = "# abby-cleanup (managed by `abby schedule`)"
TARGETS = ("cron", "schtasks", "systemd")


@dataclass
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str], "str | None"], Result]


def run_command(args: Sequence[str], input: str | None = None) -> Result:
    """The real runner: no shell, text in and out."""
    try:
        done = subprocess.run(list(args), input=input, capture_output=True, text=True)
    except FileNotFoundError:
        raise AbbyError(f"{args[0]} is not installed or not on PATH") from None
    return Result(done.returncode, done.stdout, done.stderr)


@dataclass
class Plan:
    """What an install or removal does: commands to run and files to write or delete."""

    target: str
    commands: list[tuple[list[str], str | None]] = field(default_factory=list)  # (args, stdin)
    files: dict[Path, str] = field(default_factory=dict)
    remove: list[Path] = field(default_factory=list)
    summary: str = ""


def default_target() -> str:
    return "schtasks" if os.name == "nt" else "cron"


def parse_time(at: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", at.strip())
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise InvalidInput(f"--at must be HH:MM (24-hour), got {at!r}")
    return int(m.group(1)), int(m.group(2))


def abby_command(config: Path | None, root: str | os.PathLike | None = None,
                 log_file: str | os.PathLike | None = None, older_than: float | None = None) -> list[str]:
    """The absolute command that runs this abby: its console script if that is what is
    running, else the current interpreter with `-m abbycli`."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script and script.is_file() and script.stem.lower() == "abby":
        cmd = [str(script)]
    else:
        # absolute but not resolved: a venv's python is a symlink to the base interpreter,
        # which would run without the venv's packages
        cmd = [os.path.abspath(sys.executable), "-m", "abbycli"]
    if config is not None:
        cmd += ["--config", str(Path(config).resolve())]
    if root is not None:
        cmd += ["--root", str(Path(root).resolve())]
    if log_file is not None:
        cmd += ["--log-file", str(Path(log_file).resolve())]
    cmd += ["cleanup", "--quiet"]
    if older_than is not None:
        cmd += ["--older-than", repr(older_than)]
    return cmd


# On Linux the default root and log file follow XDG variables, which a scheduler does not pass on.
_DEFAULT_FOLLOWS = {"storage.root": "XDG_DATA_HOME", "cli.log_file": "XDG_STATE_HOME"}


def job_command(settings, environ: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """The cleanup command to schedule, and the settings it leaves out (unused by cleanup).

    A scheduler runs the job without this shell's environment variables or flags,
    so every setting cleanup uses (root, age, log file) that the job would not find
    in the config file is carried as a flag. The others are checked instead: if the
    config would not even load without them, the install is refused (ConfigError),
    since the job would then fail every night.
    """
    from .config import KEYS, load_settings

    environ = os.environ if environ is None else environ
    sources = settings.sources

    def carried(name: str) -> bool:
        if sources[name] in ("env", "flag"):
            return True
        xdg = _DEFAULT_FOLLOWS.get(name)
        return (sources[name] == "default" and xdg is not None and bool(environ.get(xdg))
                and sys.platform not in ("win32", "darwin"))

    root = settings.storage.root if carried("storage.root") else None
    log_file = settings.cli.log_file if carried("cli.log_file") else None
    days = settings.storage.cleanup_days if carried("storage.cleanup_days") else None
    command = abby_command(settings.config_path, root, log_file, days)

    _check_backends(settings)
    left_out = [name for name, source in sources.items() if source == "env"
                and name not in ("storage.root", "storage.cleanup_days")]
    if left_out:
        try:
            load_settings(settings.config_path, {"storage.root": root and str(root),
                                                 "cli.log_file": log_file and str(log_file)}, env={})
        except ConfigError as exc:
            names = ", ".join(KEYS[n].env for n in left_out)
            raise ConfigError(f"the scheduled job would not see {names} (a scheduler does not pass on this "
                              f"shell's environment) and would fail every night with: {exc}. Put "
                              f"{'that setting' if len(left_out) == 1 else 'those settings'} in the config "
                              f"file instead (abby config set)") from None
    return command, [f"{KEYS[n].env} ({n})" for n in left_out]


def _check_backends(settings) -> None:
    """Refuse a job that would clean another store than this one, or fail every night: the
    ledger and image store URLs and the S3 credentials must come from the config file, not
    from this shell's environment (they hold secrets, so they are never copied into the job)."""
    from .config import KEYS

    shell_only = [n for n in ("storage.ledger_url", "storage.blobs_url") if settings.sources[n] == "env"]
    if shell_only:
        names = ", ".join(KEYS[n].env for n in shell_only)
        raise ConfigError(f"the scheduled job would not see {names} (a scheduler does not pass on this shell's "
                          f"environment) and would clean another store; put {', '.join(shell_only)} in the "
                          "config file instead (abby config set)")
    if settings.storage.blobs_url:
        from .storage.s3 import S3_SETTINGS, resolve_s3_options

        try:
            resolve_s3_options({n: settings.value(n) for n in S3_SETTINGS}, env={})
        except ConfigError as exc:
            raise ConfigError(f"the scheduled job would not see this shell's AWS_* variables and would fail "
                              f"every night with: {exc}; put the S3 settings in the config file "
                              "(abby config set storage.s3_access_key_id ..., storage.s3_secret_access_key ...)") from None


# --- cron -------------------------------------------------------------------------------------

def cron_line(command: list[str], hour: int, minute: int) -> str:
    # cron treats an unescaped % as a newline
    return f"{minute} {hour} * * * {shlex.join(command).replace('%', chr(92) + '%')} {CRON_MARK}"


def cron_with(text: str, line: str | None) -> str:
    """The crontab ``text`` with abby's line replaced by ``line`` (or removed if None);
    every other line is kept exactly."""
    kept = [l for l in text.splitlines() if not l.rstrip().endswith(CRON_MARK)]
    if line is not None:
        kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


def current_crontab(runner: Runner) -> str:
    result = runner(["crontab", "-l"], None)
    if result.returncode != 0:
        if "no crontab" in result.stderr.lower():
            return ""
        raise AbbyError(f"crontab -l failed: {result.stderr.strip() or result.returncode}")
    return result.stdout


# --- schtasks ------------------------------------------------------------------------------------

SCHTASKS_TR_MAX = 261  # schtasks refuses a longer /TR ("cannot be more than 261 character(s)")


def schtasks_create(command: list[str], hour: int, minute: int) -> list[str]:
    # /TR takes one string; list2cmdline quotes paths with spaces the way Windows parses them,
    # and subprocess quotes that string again as a single argument.
    run = subprocess.list2cmdline(command)
    if len(run) > SCHTASKS_TR_MAX:
        raise InvalidInput(f"the command to schedule is {len(run)} characters and schtasks takes at most "
                           f"{SCHTASKS_TR_MAX}; use shorter paths for abby, its config file or its root")
    return ["schtasks", "/Create", "/SC", "DAILY", "/TN", TASK_NAME, "/ST", f"{hour:02d}:{minute:02d}",
            "/TR", run, "/F"]


# --- systemd -------------------------------------------------------------------------------------

def systemd_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def systemd_quote(arg: str) -> str:
    """Quote one ExecStart argument the way systemd reads it: % starts a specifier and
    $ an environment variable, even inside quotes, so both are doubled."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_units(command: list[str], hour: int, minute: int) -> tuple[str, str]:
    service = (
        "[Unit]\n"
        "Description=abby nightly cleanup of the shared image store\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={' '.join(systemd_quote(a) for a in command)}\n"
    )
    timer = (
        "[Unit]\n"
        "Description=Run abby cleanup every day\n\n"
        "[Timer]\n"
        f"OnCalendar=*-*-* {hour:02d}:{minute:02d}:00\n"
        "Persistent=true\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    return service, timer


# --- plans -----------------------------------------------------------------------------------------

def install_plan(target: str, command: list[str], at: str, runner: Runner) -> Plan:
    hour, minute = parse_time(at)
    if any(c in arg for arg in command for c in "\r\n\0"):
        # every target keeps the command on one line (a crontab line, ExecStart=, /TR)
        raise InvalidInput("cannot schedule a command whose paths contain a line break or NUL character")
    plan = Plan(target)
    if target == "cron":
        line = cron_line(command, hour, minute)
        plan.commands.append((["crontab", "-"], cron_with(current_crontab(runner), line)))
        plan.summary = f"crontab line: {line}"
    elif target == "schtasks":
        plan.commands.append((schtasks_create(command, hour, minute), None))
        plan.summary = f"Windows task {TASK_NAME} daily at {hour:02d}:{minute:02d}"
    elif target == "systemd":
        service, timer = systemd_units(command, hour, minute)
        folder = systemd_dir()
        plan.files = {folder / f"{TASK_NAME}.service": service, folder / f"{TASK_NAME}.timer": timer}
        plan.commands += [(["systemctl", "--user", "daemon-reload"], None),
                          (["systemctl", "--user", "enable", "--now", f"{TASK_NAME}.timer"], None)]
        plan.summary = f"systemd user timer {TASK_NAME}.timer daily at {hour:02d}:{minute:02d}"
    else:
        raise InvalidInput(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    return plan


def remove_plan(target: str, runner: Runner) -> Plan:
    plan = Plan(target)
    if not show(target, runner):
        plan.summary = "nothing to remove: no abby cleanup is scheduled with " + target
        return plan
    if target == "cron":
        plan.commands.append((["crontab", "-"], cron_with(current_crontab(runner), None)))
        plan.summary = "abby's crontab line removed (other lines kept)"
    elif target == "schtasks":
        plan.commands.append((["schtasks", "/Delete", "/TN", TASK_NAME, "/F"], None))
        plan.summary = f"Windows task {TASK_NAME} deleted"
    elif target == "systemd":
        folder = systemd_dir()
        plan.commands += [(["systemctl", "--user", "disable", "--now", f"{TASK_NAME}.timer"], None),
                          (["systemctl", "--user", "daemon-reload"], None)]
        plan.remove = [folder / f"{TASK_NAME}.service", folder / f"{TASK_NAME}.timer"]
        plan.summary = f"systemd user timer {TASK_NAME}.timer disabled and its unit files deleted"
    else:
        raise InvalidInput(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    return plan


def execute(plan: Plan, runner: Runner) -> None:
    """Write the files, run the commands in order (stopping at the first failure),
    then delete the files a removal no longer needs."""
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for args, stdin in plan.commands:
        result = runner(args, stdin)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
            raise AbbyError(f"{' '.join(args[:3])} failed: {detail}")
    for path in plan.remove:
        path.unlink(missing_ok=True)


def show(target: str, runner: Runner) -> str:
    """What is installed now, as the scheduler itself reports it."""
    if target == "cron":
        lines = [l for l in current_crontab(runner).splitlines() if l.rstrip().endswith(CRON_MARK)]
        return lines[0] if lines else ""
    if target == "schtasks":
        result = runner(["schtasks", "/Query", "/TN", TASK_NAME, "/V", "/FO", "LIST"], None)
        return result.stdout.strip() if result.returncode == 0 else ""
    if target == "systemd":
        timer = systemd_dir() / f"{TASK_NAME}.timer"
        if not timer.exists():
            return ""
        status = runner(["systemctl", "--user", "list-timers", f"{TASK_NAME}.timer", "--no-pager"], None)
        service = timer.with_suffix(".service").read_text(encoding="utf-8")
        return service + "\n" + timer.read_text(encoding="utf-8") + "\n" + status.stdout.strip()
    raise InvalidInput(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
