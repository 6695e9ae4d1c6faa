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

from .errors import AbbyError, ConfigError, InvalidInput

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


def _plain(x: float) -> str:
    """16777216, not 1.67772e+07: bounds are read by people."""
    return str(int(x)) if float(x).is_integer() else repr(x)


class Bounded:
    """A number checker with inclusive bounds.

    Every numeric key has both: a value that passes must also be safe to compute
    with (1e-9 MiB rounds to 0 bytes and divides by zero, 1e300 days overflows a
    date), so the bounds are part of the key's documentation and its errors.
    """

    def __init__(self, low: float, high: float, unit: str = "", whole: bool = False):
        self.low, self.high, self.unit, self.whole = low, high, unit, whole

    @property
    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{'a whole number ' if self.whole else ''}from {_plain(self.low)} to {_plain(self.high)}{unit}"

    def __call__(self, value: Any) -> float:
        if self.whole and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"must be a whole number, got {value!r}")
        value = _number(value)
        if not self.low <= value <= self.high:
            raise ValueError(f"must be {self.text}, got {value!r}")
        return value


MAX_MIB = 16 * 1024 * 1024  # 16 TiB: far beyond any one store, and exact in a 64-bit byte count
SIZE = Bounded(0.001, MAX_MIB, "MiB (16 TiB)")  # 0.001 MiB is 1048 bytes, never 0


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def non_empty(value: Any) -> str:
    value = string(value)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _timezone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    value = non_empty(value)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'UTC' or 'Europe/Berlin')") from None
    return value


def http_url(value: Any) -> str:
    """An http(s) URL with a host, a valid port, nothing that cannot go in a request line, and
    no credentials in it (they would be printed wherever the URL is: use the provider's own
    username/password or key settings)."""
    from urllib.parse import urlsplit

    value = non_empty(value).rstrip("/")
    if not value.startswith(("https://", "http://")):
        raise ValueError(f"must start with https:// or http://, got {value!r}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if "@" in parts.netloc:
        raise ValueError("must not hold a user name or password (they would be shown wherever the URL is); "
                         "use the provider's username/password or key settings")
    if not parts.hostname:
        raise ValueError(f"has no host: {value!r}")
    return value


def _user_id(value: Any) -> str:
    from .storage.names import validate_user_id

    try:
        return validate_user_id(non_empty(value))
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def api_key(value: Any) -> str:
    from .secrets import clean_api_key

    return clean_api_key(value)  # its messages never contain the key


def _ledger_url(value: Any) -> str:
    value = non_empty(value)
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql://user:password@host:port/database URL "
                         "(leave it unset for the SQLite ledger under storage.root)")
    authority = value.split("://", 1)[1].split("/", 1)[0]
    if authority.count("@") > 1:
        # libpq would split at the first '@' and take the rest of the password for the host,
        # then print it in every "cannot reach" message.
        raise ValueError("has more than one '@' before the host: write an '@' inside the user name or "
                         "password as %40")
    return value


def _blobs_url(value: Any) -> str:
    value = non_empty(value)
    if not value.startswith("s3://"):
        raise ValueError("must be an s3://bucket/prefix URL (leave it unset for the folder under storage.root)")
    return value


def masked_url(value: Any) -> Any:
    """A URL with its password masked, in the authority (postgresql://abby:********@db/abby)
    or as a parameter (?password=********), which libpq accepts too."""
    import re

    if not isinstance(value, str):
        return value
    value = re.sub(r"(://[^:/@]*:)[^/]*@", r"\1********@", value)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1********", value)


def _provider(value: Any) -> str:
    from .generation.provider import load

    value = non_empty(value)
    try:
        load(value)  # installed, and a Provider
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
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
    path: bool = False  # a file path: relative to the config file's folder when set there
    show: Callable[[Any], Any] | None = None  # how `config show` displays it (a URL's password masked)

    @property
    def section(self) -> str:
        return self.name.rpartition(".")[0]  # "storage", or "providers.openai" for a provider's key

    @property
    def short(self) -> str:
        return self.name.rpartition(".")[2]

    def parse_text(self, text: str) -> Any:
        """Turn text from an env var or the command line into a typed value."""
        if self.from_text is None:
            return self.check(text)
        try:
            raw = self.from_text(text.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {text.strip()!r}") from None
        return self.check(raw)


def number_text(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


KEYS: dict[str, Key] = {
    k.name: k
    for k in [
        Key("storage.root", non_empty, None,
            "Folder holding images/, temp/ and the .abby/ ledger. A relative path is relative\n"
            "to this file's folder. Default: <user data dir>/shared.", env="STORAGE_ROOT"),
        Key("storage.max_global_storage_mb", SIZE, 5000,
            "Cap on all stored images together, in MiB.", env="MAX_GLOBAL_STORAGE_MB", from_text=number_text),
        Key("storage.max_user_storage_mb", SIZE, 500,
            "Cap on one user's stored images, in MiB. Must not exceed the global cap.",
            env="MAX_USER_STORAGE_MB", from_text=number_text),
        Key("storage.max_user_daily_gens", Bounded(1, 1_000_000, whole=True), 5,
            "Paid generations one user may start per day.", env="MAX_USER_DAILY_GENS", from_text=number_text),
        Key("storage.cleanup_days", Bounded(0.001, 36_500, "days (100 years)"), 7,
            "`abby cleanup` deletes images created more than this many days ago.",
            env="STORAGE_CLEANUP_DAYS", from_text=number_text),
        Key("storage.image_generation_size_mb", SIZE, 1.5,
            "Room (MiB) a generation reserves before its image exists. Must not exceed the per-user\n"
            "cap, or no generation could ever start.", env="IMAGE_GEN_SIZE_MB",
            from_text=number_text),
        Key("storage.daily_reset_timezone", _timezone, "UTC",
            "IANA time zone whose midnight starts a new daily allowance."),
        Key("storage.ledger_url", _ledger_url, None,
            "Keep the ledger in PostgreSQL, shared by every host: postgresql://user:password@host:5432/db\n"
            "(needs `pip install 'abbycli[postgres]'`). Default: the SQLite file under storage.root.",
            env="ABBY_LEDGER_URL", show=masked_url),
        Key("storage.blobs_url", _blobs_url, None,
            "Keep the images in an S3-compatible bucket: s3://bucket/prefix (needs\n"
            "`pip install 'abbycli[s3]'`). Default: the images/ folder under storage.root.",
            env="ABBY_BLOBS_URL"),
        Key("storage.s3_endpoint", http_url, None,
            "S3 endpoint URL (omit for AWS). AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL win over it."),
        Key("storage.s3_region", non_empty, None, "S3 region. AWS_REGION or AWS_DEFAULT_REGION win over it.\n"
            "Default: us-east-1."),
        Key("storage.s3_access_key_id", non_empty, None, "S3 access key id. AWS_ACCESS_KEY_ID wins over it."),
        Key("storage.s3_secret_access_key", non_empty, None,
            "S3 secret key. Prefer AWS_SECRET_ACCESS_KEY, which wins over it.", secret=True),
        Key("storage.s3_session_token", non_empty, None,
            "S3 session token (temporary credentials). AWS_SESSION_TOKEN wins over it.", secret=True),
        Key("storage.url_lifetime", Bounded(1, 604_800, "seconds (7 days)", whole=True), 3600,
            "How long a URL printed by `abby list --url` / `abby info --url` stays valid (S3 only).",
            from_text=number_text),
        Key("generation.provider", _provider, "stability",
            "Default image provider: stability, openai, automatic1111, comfyui, local, or an installed\n"
            "plugin's name (`abby providers` lists them). Each one's settings are in [providers.<name>].",
            env="ABBY_PROVIDER"),
        # The Stability provider's settings from before there were providers: still read, so
        # existing files and STABILITY_* variables keep working ([providers.stability] wins).
        Key("generation.api_host", http_url, "https://api.stability.ai",
            "Stability's api_host, read when providers.stability.api_host is not set.", env="STABILITY_API_HOST"),
        Key("generation.api_key", api_key, None,
            "Stability's api_key, read when providers.stability.api_key is not set. Prefer the\n"
            "STABILITY_API_KEY environment variable (abby writes this file with mode 0600).",
            env="STABILITY_API_KEY", secret=True),
        Key("generation.model", non_empty, "core", "Stability's model, read when providers.stability.model is not set."),
        Key("generation.img2img_model", non_empty, "sd3.5-large",
            "Stability's img2img_model, read when providers.stability.img2img_model is not set."),
        Key("generation.upscale_mode", non_empty, None,
            "Stability's upscale_mode, read when providers.stability.upscale_mode is not set."),
        Key("generation.upscale_timeout", Bounded(1, 1800, "seconds"), 600,
            "Stability's upscale_timeout, read when providers.stability.upscale_timeout is not set.\n"
            "Every provider time-out is at most 30 minutes: the storage reservation a request holds\n"
            "is reclaimed as abandoned after an hour, so a request must always end well before that.",
            from_text=number_text),
        Key("generation.max_megapixels", Bounded(0.01, 89, "megapixels"), 40,
            "Largest image, in megapixels (million pixels), that abby reads as an input or makes\n"
            "locally; larger ones are refused before any memory is spent on them. At most 89:\n"
            "the store refuses images beyond Pillow's decompression-bomb limit (89.5 megapixels).",
            from_text=number_text),
        Key("cli.default_user", _user_id, None,
            "User id the command line acts for when --user is not given."),
        Key("cli.log_file", non_empty, None,
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
    ledger_url: str | None = field(default=None, repr=False)  # may hold a password
    blobs_url: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = field(default=None, repr=False)
    s3_session_token: str | None = field(default=None, repr=False)
    url_lifetime: int = 3600


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
    provider_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # [providers.<name>]
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # the environment it was loaded with

    def value(self, name: str) -> Any:
        key = KEYS[name]
        return getattr(getattr(self, key.section), key.short)

    def secrets(self) -> tuple[str, ...]:
        """Every secret these settings hold (API keys, passwords, the ledger URL's password), for
        the last-resort scrubbing of output and logs. A provider whose settings cannot be read
        adds nothing here: its error is reported where it is used."""
        from urllib.parse import urlsplit

        found = [self.value(k.name) for k in KEYS.values() if k.secret]
        if self.storage.ledger_url:
            try:
                found.append(urlsplit(self.storage.ledger_url).password)
            except ValueError:
                pass
        from .generation.provider import installed, load

        for name in installed():
            try:
                keys = {k.short for k in load(name).settings if k.secret}
                found += [v for k, (v, _) in self.provider_values(name).items() if k in keys]
            except AbbyError:
                continue
        return tuple(sorted({str(v) for v in found if v}, key=len, reverse=True))

    def provider_config(self, name: str) -> dict[str, Any]:
        """Every setting of provider ``name``, each from (highest first) its environment
        variable, its [providers.<name>] table, a legacy [generation] key, or its default."""
        return {short: value for short, (value, _) in self.provider_values(name).items()}

    def provider_values(self, name: str) -> dict[str, tuple[Any, str]]:
        """``provider_config`` with where each value came from: env, file, legacy or default."""
        from .generation.provider import load

        cls = load(name)
        table = self.provider_tables.get(name, {})
        out: dict[str, tuple[Any, str]] = {}
        for key in cls.settings:
            legacy = cls.legacy.get(key.short)
            try:
                if key.env and self.env.get(key.env, "") != "":
                    where = f"environment variable {key.env}"
                    out[key.short] = key.parse_text(self.env[key.env]), "env"
                elif key.short in table:
                    value = table[key.short]
                    if key.path and self.config_path is not None:
                        value = str(self.config_path.parent / Path(value).expanduser())
                    out[key.short] = value, "file"
                elif legacy and self.sources.get(legacy, "default") != "default":
                    where = _origin(legacy, self.sources, self.config_path) + f" ({legacy})"
                    out[key.short] = key.check(self.value(legacy)), f"{self.sources[legacy]} ({legacy})"
                else:
                    out[key.short] = key.default, "default"
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return out


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
    """Validate a parsed config file; return {dotted key: clean value}. A provider's table
    ``[providers.<name>]`` is checked by that provider's own keys."""
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if section == "providers" and isinstance(table, dict):
            from .generation.provider import validate_table

            for name, sub in table.items():
                values.update({f"providers.{name}.{k}": v for k, v in validate_table(name, sub, where).items()})
            continue
        if section not in SECTIONS and not isinstance(table, dict):
            raise ConfigError(f"{where}: {_outside_section(section)}")
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]{_suggest(section, list(SECTIONS) + ['providers'])}")
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


def key_for(name: str) -> Key:
    """The Key for a dotted name: one of KEYS, or ``providers.<provider>.<key>``."""
    if name in KEYS:
        return KEYS[name]
    if name.startswith("providers.") and name.count(".") == 2:
        from .generation.provider import load, suggest

        _, provider, short = name.split(".")
        keys = {k.short: k for k in load(provider).settings}
        if short in keys:
            return keys[short]
        raise ConfigError(f"unknown key '{name}'{suggest(short, keys)}; provider {provider} has: "
                          f"{', '.join(keys) or 'no settings'}")
    raise ConfigError(f"unknown key '{name}'{_suggest(name, list(KEYS))}")


def _outside_section(name: str) -> str:
    """What to say about ``name = ...`` written above every [section] header."""
    owners = [k for k in KEYS.values() if k.short == name]
    if owners:
        return (f"'{name}' is a key outside any section; write it under its section: "
                f"[{owners[0].section}] {name} = ...")
    return (f"'{name}' is a key outside any section; every key belongs under one of "
            + ", ".join(f"[{s}]" for s in SECTIONS))


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

    tables: dict[str, dict[str, Any]] = {}  # [providers.<name>] tables, checked
    if path is not None:
        for name, value in check_document(read_toml(path), str(path)).items():
            if name.startswith("providers."):
                _, provider, short = name.split(".")
                tables.setdefault(provider, {})[short] = value
            else:
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

    conflict = _size_conflict(values)
    if conflict:
        small, large = conflict
        where = {_origin(small, sources, path), _origin(large, sources, path)}
        if len(where) == 1:  # both sides from one place: name it once
            raise ConfigError(f"{where.pop()}: {small} ({values[small]}) is above {large} ({values[large]})")
        raise ConfigError(f"{small} ({values[small]}, from {_origin(small, sources, path)}) is above "
                          f"{large} ({values[large]}, from {_origin(large, sources, path)})")

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
        provider_tables=tables,
        env=dict(env),
    )


# (smaller, larger): sizes that only make sense in this order. A per-user cap above the
# global one is never reached; a reservation above the per-user cap can never be made.
SIZE_ORDER = [("storage.max_user_storage_mb", "storage.max_global_storage_mb"),
              ("storage.image_generation_size_mb", "storage.max_user_storage_mb")]


def _size_conflict(values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first (smaller, larger) pair out of order; unset keys count as their defaults."""
    def get(name: str) -> float:
        return values.get(name, KEYS[name].default)

    return next(((a, b) for a, b in SIZE_ORDER if get(a) > get(b)), None)


def _origin(name: str, sources: Mapping[str, str], path: Path | None) -> str:
    """Where a value came from, in words a user can act on."""
    source = sources[name]
    if source == "file":
        return str(path)
    if source == "env":
        return f"environment variable {KEYS[name].env}"
    if source == "flag":
        return "the command line"
    return "the built-in default"


def display_value(settings: Settings, name: str) -> Any:
    """The value as `config show` prints it: secrets masked, paths as text."""
    value = settings.value(name)
    if KEYS[name].secret:
        return None if value is None else "********"
    if KEYS[name].show is not None:
        return KEYS[name].show(value)
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
            if isinstance(key.check, Bounded):
                lines.append(f"# Allowed: {key.check.text}.")
            if key.env:
                lines.append(f"# Environment: {key.env}")
            if key.name in values:
                lines.append(tomli_w.dumps({key.short: values[key.name]}).strip())
            elif key.default is None:
                example = {"storage.root": "/srv/abby/shared", "cli.default_user": "alice",
                           "storage.ledger_url": "postgresql://abby:PASSWORD@db.example:5432/abby",
                           "storage.blobs_url": "s3://my-bucket/abby",
                           "storage.s3_endpoint": "https://s3.example.com", "storage.s3_region": "eu-west-3",
                           "cli.log_file": "/var/log/abby/abby.log",
                           "generation.upscale_mode": "local"}.get(key.name, "")
                lines.append(f'# {key.short} = "{example}"')
            else:
                lines.append("# " + tomli_w.dumps({key.short: key.default}).strip())
            lines.append("")
        lines.pop()
    for section in dict.fromkeys(n.rpartition(".")[0] for n in values if n.startswith("providers.")):
        lines += ["", f"[{section}]"]
        for name in (n for n in values if n.rpartition(".")[0] == section):
            key = key_for(name)
            lines += [f"# {line}" for line in key.doc.splitlines()]
            lines.append(tomli_w.dumps({key.short: values[name]}).strip())
    return "\n".join(lines) + "\n"


# Pauses between attempts to replace a config file another program holds open (Windows
# refuses with "access denied" while an editor or a virus scanner has it): about 1.5 s in all.
REPLACE_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically; the file is 0600 on POSIX (it may hold a key).

    Raises ConfigError (one line) when the file cannot be written; the old file
    is then unchanged and no temporary file is left behind.
    """
    import time

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            for delay in REPLACE_RETRY_DELAYS:
                try:
                    os.replace(tmp, path)
                    return
                except PermissionError:
                    time.sleep(delay)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except PermissionError:
        raise ConfigError(f"cannot write {path}: access denied (if another program has it open, "
                          "close it and try again)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def set_value(path: Path, name: str, text: str) -> bool:
    """Set one key in the file at ``path`` (created if missing), keeping the other values.

    The file is rewritten from ``render_template``, so abby's own comments stay;
    returns True if the old file had other comments, which are not kept.
    """
    key = key_for(name)
    try:
        value = key.parse_text(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    old_text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    values = check_document(read_toml(path), str(path)) if path.exists() else {}
    values[name] = value
    conflict = _size_conflict(values)
    if conflict:
        small, large = conflict
        shown = {n: f"{values[n]}" if n in values else f"{KEYS[n].default}, the default" for n in conflict}
        raise ConfigError(f"{path}: {small} ({shown[small]}) would be above {large} ({shown[large]})")
    new_text = render_template(values)
    own = {line for line in new_text.splitlines() if line.lstrip().startswith("#")}
    lost = any(line.lstrip().startswith("#") and line not in own and not _is_commented_key(line)
               for line in old_text.splitlines())
    write_private(path, new_text)
    return lost


def _is_commented_key(line: str) -> bool:
    """'# max_user_storage_mb = 500' is a template line, not a user's comment."""
    body = line.lstrip("# ").split("=", 1)[0].strip()
    return any(body == k.short for k in KEYS.values())
