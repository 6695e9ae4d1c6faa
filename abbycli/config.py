"""Configuration: one table of known keys, discovery, validation and saving.

Every key abby understands is declared once in ``KEYS``; validation, the
environment overrides, ``abby config show``, ``abby config set`` and the
commented starter file are all driven from that table, so they cannot drift.

Precedence, highest first: command-line flag > environment variable > config
file > built-in default. The config file itself is found in this order:
``--config PATH`` > ``$ABBY_CONFIG`` > ``abby.toml`` in the user config dir >
``abby.toml`` in the site config dir (both from platformdirs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError, InvalidInput

APP_NAME = "abby"
CONFIG_FILENAME = "abby.toml"
CONFIG_ENV = "ABBY_CONFIG"


# --- value checkers: each takes a parsed TOML value and returns the clean one,
# or raises ValueError with the problem in a few words.


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


def _positive_number(value: Any) -> float:
    value = _number(value)
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, got {value!r}")
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _non_empty(value: Any) -> str:
    value = _string(value)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _timezone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    value = _non_empty(value)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'UTC' or 'Europe/Berlin')") from None
    return value


def _url(value: Any) -> str:
    value = _non_empty(value).rstrip("/")
    if not value.startswith(("https://", "http://")):
        raise ValueError(f"must start with https:// or http://, got {value!r}")
    return value


def _user_id(value: Any) -> str:
    from .storage.names import validate_user_id

    try:
        return validate_user_id(_non_empty(value))
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def _model(value: Any) -> str:
    from .generation.request import family

    value = _non_empty(value)
    try:
        family(value)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    return value


def _upscale_mode(value: Any) -> str:
    from .generation.request import UPSCALE_MODES

    value = _non_empty(value)
    if value not in UPSCALE_MODES:
        raise ValueError(f"unknown upscale mode {value!r}; choose one of: {', '.join(UPSCALE_MODES)}")
    return value


def _provider(value: Any) -> str:
    value = _non_empty(value)
    if value != "stability":
        raise ValueError(f"unknown provider {value!r} (the only provider is 'stability')")
    return value


@dataclass(frozen=True)
class Key:
    name: str  # dotted: "storage.max_user_storage_mb"
    check: Callable[[Any], Any]
    default: Any
    doc: str
    env: str | None = None
    secret: bool = False
    from_text: Callable[[str], Any] | None = None  # how to read env vars and `config set`

    @property
    def section(self) -> str:
        return self.name.split(".")[0]

    @property
    def short(self) -> str:
        return self.name.split(".")[1]

    def parse_text(self, text: str) -> Any:
        """Turn text from an env var or the command line into a typed value."""
        if self.from_text is None:
            return self.check(text)
        try:
            raw = self.from_text(text.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {text!r}") from None
        return self.check(raw)


def _num_text(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


KEYS: dict[str, Key] = {
    k.name: k
    for k in [
        Key("storage.root", _non_empty, None,
            "Folder holding images/, temp/ and the .abby/ ledger. A relative path is relative\n"
            "to this file's folder. Default: <user data dir>/shared.", env="STORAGE_ROOT"),
        Key("storage.max_global_storage_mb", _positive_number, 5000,
            "Cap on all stored images together, in MiB.", env="MAX_GLOBAL_STORAGE_MB", from_text=_num_text),
        Key("storage.max_user_storage_mb", _positive_number, 500,
            "Cap on one user's stored images, in MiB. Must not exceed the global cap.",
            env="MAX_USER_STORAGE_MB", from_text=_num_text),
        Key("storage.max_user_daily_gens", _positive_int, 5,
            "Paid generations one user may start per day.", env="MAX_USER_DAILY_GENS", from_text=int),
        Key("storage.cleanup_days", _positive_number, 7,
            "`abby cleanup` deletes images created more than this many days ago.",
            env="STORAGE_CLEANUP_DAYS", from_text=_num_text),
        Key("storage.image_generation_size_mb", _positive_number, 1.5,
            "Room (MiB) a generation reserves before its image exists.", env="IMAGE_GEN_SIZE_MB",
            from_text=_num_text),
        Key("storage.daily_reset_timezone", _timezone, "UTC",
            "IANA time zone whose midnight starts a new daily allowance."),
        Key("generation.provider", _provider, "stability", "Image provider. Only 'stability' for now."),
        Key("generation.api_host", _url, "https://api.stability.ai", "Base URL of the provider's API.",
            env="STABILITY_API_HOST"),
        Key("generation.api_key", _non_empty, None,
            "API key. Prefer the STABILITY_API_KEY environment variable; if you set it here,\n"
            "keep this file private (abby writes it with mode 0600).", env="STABILITY_API_KEY", secret=True),
        Key("generation.model", _model, "core",
            "Default text-to-image model: core, ultra, sd3.5-large, sd3.5-large-turbo, sd3.5-medium,\n"
            "sd3.5-flash, or a v1 engine id such as stable-diffusion-xl-1024-v1-0."),
        Key("generation.img2img_model", _model, "sd3.5-large", "Default image-to-image model."),
        Key("generation.upscale_mode", _upscale_mode, None,
            "Default upscale mode: fast, conservative, creative, esrgan or local.\n"
            "Default: fast when an API key is set, local (offline, free) when not."),
        Key("generation.upscale_timeout", _positive_number, 600,
            "Seconds to wait for a creative upscale to finish.", from_text=_num_text),
        Key("generation.max_megapixels", _positive_number, 40,
            "Largest image, in megapixels (million pixels), that abby reads as an input or makes\n"
            "locally; larger ones are refused before any memory is spent on them.", from_text=_num_text),
        Key("cli.default_user", _user_id, None,
            "User id the command line acts for when --user is not given."),
        Key("cli.log_file", _non_empty, None,
            "Log of unattended commands (cleanup, check --fix, schedule) and generation failures,\n"
            "rotated at 1 MiB, 5 kept. Relative paths are relative to this file's folder.\n"
            "Default: <user log dir>/abby.log."),
    ]
}
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS.values()))


def user_config_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / CONFIG_FILENAME


def site_config_path() -> Path:
    import platformdirs

    return Path(platformdirs.site_config_dir(APP_NAME, appauthor=False)) / CONFIG_FILENAME


def default_log_file() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)) / "abby.log"


def default_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "shared"


@dataclass(frozen=True)
class StorageSettings:
    root: Path
    max_global_storage_mb: float = 5000
    max_user_storage_mb: float = 500
    max_user_daily_gens: int = 5
    cleanup_days: float = 7
    image_generation_size_mb: float = 1.5
    daily_reset_timezone: str = "UTC"


@dataclass(frozen=True)
class GenerationSettings:
    provider: str = "stability"
    api_host: str = "https://api.stability.ai"
    api_key: str | None = field(default=None, repr=False)  # never in a repr or traceback
    model: str = "core"
    img2img_model: str = "sd3.5-large"
    upscale_mode: str | None = None
    upscale_timeout: float = 600
    max_megapixels: float = 40


@dataclass(frozen=True)
class CliSettings:
    default_user: str | None = None
    log_file: Path | None = None


@dataclass(frozen=True)
class Settings:
    storage: StorageSettings
    generation: GenerationSettings
    cli: CliSettings
    config_path: Path | None  # the file in use, if any
    sources: Mapping[str, str]  # dotted key -> "default" | "file" | "env" | "flag"

    def value(self, name: str) -> Any:
        key = KEYS[name]
        return getattr(getattr(self, key.section), key.short)


def search_list(env: Mapping[str, str] | None = None) -> list[tuple[str, Path]]:
    """Where abby looks for its config file when no --config is given."""
    env = os.environ if env is None else env
    places = []
    if env.get(CONFIG_ENV):
        places.append((f"${CONFIG_ENV}", Path(env[CONFIG_ENV])))
    places.append(("user config", user_config_path()))
    places.append(("site config", site_config_path()))
    return places


def find_config(flag: str | os.PathLike | None, env: Mapping[str, str]) -> Path | None:
    """The config file in use, or None when abby runs on defaults."""
    if flag is not None:
        path = Path(flag)
        if not path.is_file():
            raise ConfigError(f"config file {path} (from --config) does not exist")
        return path
    if env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
        if not path.is_file():
            raise ConfigError(f"config file {path} (from ${CONFIG_ENV}) does not exist")
        return path
    for _, path in search_list({}):
        if path.is_file():
            return path
    return None


def read_toml(path: Path) -> dict[str, Any]:
    import tomllib
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already carries "(at line L, column C)".
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _suggest(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_document(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a parsed config file; return {dotted key: clean value}."""
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]{_suggest(section, list(SECTIONS))}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: '{section}' must be a table ([{section}])")
        for short, raw in table.items():
            name = f"{section}.{short}"
            if name not in KEYS:
                raise ConfigError(f"{where}: unknown key '{name}'{_suggest(name, list(KEYS))}")
            try:
                values[name] = KEYS[name].check(raw)
            except ValueError as exc:
                raise ConfigError(f"{where}: {name}: {exc}") from None
    return values


def load_settings(
    config: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Find, read and validate the configuration.

    ``overrides`` holds values from command-line flags (dotted key -> value,
    already typed or as text). Raises ConfigError with a one-line message that
    names the file or variable, the key and the problem.
    """
    env = os.environ if env is None else env
    path = find_config(config, env)
    values: dict[str, Any] = {name: key.default for name, key in KEYS.items()}
    sources = {name: "default" for name in KEYS}

    if path is not None:
        for name, value in check_document(read_toml(path), str(path)).items():
            values[name], sources[name] = value, "file"
    for name, key in KEYS.items():
        if key.env and env.get(key.env, "") != "":
            try:
                values[name] = key.parse_text(env[key.env])
            except ValueError as exc:
                raise ConfigError(f"environment variable {key.env} ({name}): {exc}") from None
            sources[name] = "env"
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        key = KEYS[name]
        try:
            values[name] = key.parse_text(raw) if isinstance(raw, str) else key.check(raw)
        except ValueError as exc:
            raise ConfigError(f"option for {name}: {exc}") from None
        sources[name] = "flag"

    conflict = _caps_conflict(values)
    if conflict:
        user_mb, global_mb = conflict
        raise ConfigError(
            f"{_origin('storage.max_user_storage_mb', sources, path)}: storage.max_user_storage_mb ({user_mb}) "
            f"is above storage.max_global_storage_mb ({global_mb}, from {sources['storage.max_global_storage_mb']})"
        )

    def resolve(name: str, default: Callable[[], Path]) -> Path:
        """A path setting: relative to the config file's folder if it came from the file,
        else to the current folder."""
        if values[name] is None:
            return default()
        value = Path(values[name]).expanduser()
        if not value.is_absolute():
            value = (path.parent if sources[name] == "file" and path is not None else Path.cwd()) / value
        return Path(os.path.abspath(value))

    root = resolve("storage.root", default_root)

    def section(name: str) -> dict[str, Any]:
        return {k.short: values[k.name] for k in KEYS.values() if k.section == name}

    storage = section("storage")
    storage["root"] = root
    cli = section("cli")
    cli["log_file"] = resolve("cli.log_file", default_log_file)
    return Settings(
        storage=StorageSettings(**storage),
        generation=GenerationSettings(**section("generation")),
        cli=CliSettings(**cli),
        config_path=path,
        sources=sources,
    )


def _caps_conflict(values: Mapping[str, Any]) -> tuple[float, float] | None:
    """(per-user cap, global cap) when the per-user one is larger; unset keys count as their defaults."""
    user_mb = values.get("storage.max_user_storage_mb", KEYS["storage.max_user_storage_mb"].default)
    global_mb = values.get("storage.max_global_storage_mb", KEYS["storage.max_global_storage_mb"].default)
    return (user_mb, global_mb) if user_mb > global_mb else None


def _origin(name: str, sources: Mapping[str, str], path: Path | None) -> str:
    source = sources[name]
    if source == "file":
        return str(path)
    if source == "env":
        return f"environment variable {KEYS[name].env}"
    return source


def display_value(settings: Settings, name: str) -> Any:
    """The value as `config show` prints it: secrets masked, paths as text."""
    value = settings.value(name)
    if KEYS[name].secret:
        return None if value is None else "********"
    if isinstance(value, Path):
        return str(value)
    return value


def render_template(values: Mapping[str, Any] | None = None) -> str:
    """The config file abby writes: every key documented, set keys active.

    Keys in ``values`` (dotted name -> value) are written as TOML with tomli-w;
    the others stay commented out with their default, so the file documents
    itself however often ``abby config set`` rewrites it.
    """
    import tomli_w

    values = values or {}
    lines = [
        "# abby configuration. Every key is optional; commented lines show the defaults.",
        "# Environment variables, where named, override this file; command-line flags override both.",
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key in (k for k in KEYS.values() if k.section == section):
            lines += [f"# {line}" for line in key.doc.splitlines()]
            if key.env:
                lines.append(f"# Environment: {key.env}")
            if key.name in values:
                lines.append(tomli_w.dumps({key.short: values[key.name]}).strip())
            elif key.default is None:
                example = {"storage.root": "/srv/abby/shared", "cli.default_user": "alice",
                           "cli.log_file": "/var/log/abby/abby.log",
                           "generation.upscale_mode": "local"}.get(key.name, "")
                lines.append(f'# {key.short} = "{example}"')
            else:
                lines.append("# " + tomli_w.dumps({key.short: key.default}).strip())
            lines.append("")
        lines.pop()
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically; the file is 0600 on POSIX (it may hold a key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def set_value(path: Path, name: str, text: str) -> bool:
    """Set one key in the file at ``path`` (created if missing), keeping the other values.

    The file is rewritten from ``render_template``, so abby's own comments stay;
    returns True if the old file had other comments, which are not kept.
    """
    if name not in KEYS:
        raise ConfigError(f"unknown key '{name}'{_suggest(name, list(KEYS))}")
    key = KEYS[name]
    try:
        value = key.parse_text(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    old_text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    values = check_document(read_toml(path), str(path)) if path.exists() else {}
    values[name] = value
    conflict = _caps_conflict(values)
    if conflict:
        user_mb, global_mb = conflict
        raise ConfigError(
            f"{path}: storage.max_user_storage_mb ({user_mb}) would be above "
            f"storage.max_global_storage_mb ({global_mb})"
        )
    new_text = render_template({k: values[k] for k in KEYS if k in values})
    own = {line for line in new_text.splitlines() if line.lstrip().startswith("#")}
    lost = any(line.lstrip().startswith("#") and line not in own and not _is_commented_key(line)
               for line in old_text.splitlines())
    write_private(path, new_text)
    return lost


def _is_commented_key(line: str) -> bool:
    """'# max_user_storage_mb = 500' is a template line, not a user's comment."""
    body = line.lstrip("# ").split("=", 1)[0].strip()
    return any(body == k.short for k in KEYS.values())
