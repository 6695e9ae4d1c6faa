"""The Provider interface, and how providers are found.

A provider turns a checked ``ImageRequest`` into images. abby's pipeline (quota,
refunds, storage, history) and its command line talk to providers only through
this interface, so a backend is one module, and a third-party package adds one
by declaring an entry point in the group ``abbycli.providers``::

    [project.entry-points."abbycli.providers"]
    mybackend = "abby_provider_mybackend:MyProvider"

abby's own providers are registered the same way in its ``pyproject.toml``.

What abby does around every provider, so a provider never has to:
- checks an input image (size limit from its header, then a full decode) before
  ``prepare`` sees it;
- reserves the daily slots and storage room before ``run`` and refunds what did
  not become a stored image;
- makes an upscale exactly the ``--width``/``--factor`` asked for (``native_factor``
  says what the provider returns when neither is given);
- verifies, stores and records every image ``run`` hands back.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Mapping

from ..errors import ConfigError, InvalidInput, ProviderError

if TYPE_CHECKING:
    import httpx

    from ..config import Key
    from .http import Progress
    from .request import GeneratedImage, ImageRequest

GROUP = "abbycli.providers"
OPERATIONS = ("text-to-image", "image-to-image", "upscale")

OnImages = Callable[[list["GeneratedImage | ProviderError"]], Awaitable[None]]


@dataclass(frozen=True)
class Option:
    """A provider-specific extra passed as ``--option KEY=VALUE``. ``parse`` turns the text
    (or a typed value from a bot) into the value sent, or raises ValueError."""

    parse: Callable[[Any], Any]
    doc: str


class Provider(ABC):
    """One image backend. Subclasses set the class attributes and implement ``prepare``,
    ``describe`` and ``run``; the rest has defaults."""

    name: ClassVar[str]  # the entry-point name: "openai", what --provider takes
    title: ClassVar[str]  # for messages: "OpenAI Images"
    operations: ClassVar[tuple[str, ...]]  # a subset of OPERATIONS
    settings: ClassVar[tuple["Key", ...]] = ()  # the keys of its [providers.<name>] table
    options: ClassVar[Mapping[str, Option]] = {}  # what --option KEY=VALUE accepts
    # Keys of the [generation] table that still configure this provider (Stability's, from
    # before providers existed): {setting: "generation.key"}.
    legacy: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: Mapping[str, Any], *, transport: httpx.AsyncBaseTransport | None = None):
        """``config`` holds a value for every key in ``settings`` (defaults filled in);
        ``transport`` replaces the network in tests."""
        self.config = dict(config)
        self.transport = transport

    def __repr__(self) -> str:  # never the config: it may hold a key
        return f"{type(self).__name__}()"

    # --- describing itself -----------------------------------------------------------
    def default_model(self, operation: str) -> str | None:
        """The model used when the request names none."""
        return None

    def models(self, operation: str) -> tuple[str, ...]:
        """The model names abby knows for an operation; empty when the server decides."""
        return ()

    def configured(self) -> tuple[bool, str]:
        """Whether it can run as configured, and a few words why or why not (no network)."""
        return True, ""

    # --- a request's life ----------------------------------------------------------------
    @abstractmethod
    def prepare(self, req: ImageRequest) -> ImageRequest:
        """Fill in the defaults and check every value against what the backend accepts.
        Raises InvalidInput (or ConfigError for a missing key) before anything is sent.
        May hand the request to another provider by returning it with another ``provider``."""

    @abstractmethod
    def describe(self, req: ImageRequest) -> list[dict[str, Any]]:
        """The exact HTTP requests ``run`` would send, for --dry-run: each a dict with
        ``method``, ``url``, ``headers`` (secrets masked) and ``json`` or ``multipart``."""

    @abstractmethod
    async def run(self, req: ImageRequest, *, user_id: str | None, concurrency: int,
                  progress: Progress | None, on_images: OnImages) -> list[GeneratedImage | ProviderError]:
        """Run a prepared request; one entry per image: the image, or the ProviderError it
        failed with (so a request for 3 that gets 2 returns 2 images and 1 error). Every
        batch is also given to ``on_images`` as soon as it arrives. Each image's bytes are
        checked with ``imaging.inspect(data, from_provider=True)`` before they are handed back."""

    def is_free(self, req: ImageRequest) -> bool:
        """True when the request takes no daily slot (it still needs storage room)."""
        return False

    def native_factor(self, req: ImageRequest) -> float:
        """For an upscale: the scale the backend applies when neither --width nor --factor is given."""
        return 2.0

    def secrets(self) -> tuple[str, ...]:
        """The values abby scrubs from everything this provider's backend sends back before it
        is shown or stored: by default every setting declared ``secret``. A provider that
        derives another secret (a Basic token) adds it."""
        return tuple(str(self.config[k.short]) for k in self.settings if k.secret and self.config.get(k.short))

    async def list_models(self) -> list[str]:
        """The models the backend offers now (may ask the server: AUTOMATIC1111's checkpoints);
        by default the names abby knows."""
        return sorted({m for op in self.operations for m in self.models(op)})

    async def balance(self) -> float | None:
        """The account's remaining credits, or None when the backend has no such thing."""
        return None

    async def aclose(self) -> None:
        """Close connections; the provider may be used again afterwards."""

    # --- helpers for subclasses ---------------------------------------------------------------
    def parse_options(self, req: ImageRequest, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The request's --option values, typed; InvalidInput for a key this provider does not
        take (or does not take here: ``allowed`` narrows ``options`` for a model/operation)."""
        known = tuple(self.options) if allowed is None else allowed
        out: dict[str, Any] = {}
        for key, raw in (req.options or {}).items():
            if key not in known:
                if not known:
                    raise InvalidInput(f"provider {self.name} takes no --option here (got {key!r})")
                raise InvalidInput(f"--option {key} is not accepted by provider {self.name} here"
                                   f"{suggest(key, known)}; it takes: {', '.join(known)}")
            try:
                out[key] = self.options[key].parse(raw)
            except ValueError as exc:
                raise InvalidInput(f"--option {key}: {exc}") from None
        return out


def suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- discovery -------------------------------------------------------------------------------
_found: dict[str, Any] | None = None


def installed() -> dict[str, Any]:
    """Entry points of the installed providers, by name (read once per process)."""
    global _found
    if _found is None:
        from importlib.metadata import entry_points

        _found = {ep.name: ep for ep in entry_points(group=GROUP)}
    return _found


def load(name: str) -> type[Provider]:
    """The provider class registered as ``name``; ConfigError naming the installed ones."""
    points = installed()
    if name not in points:
        names = ", ".join(sorted(points)) or "none (is abby installed? `pip install abbycli`)"
        raise ConfigError(f"unknown provider {name!r}{suggest(name, points)}; installed providers: {names}")
    try:
        cls = points[name].load()
    except (Exception, SystemExit) as exc:  # a broken plugin must not take abby down, nor end it
        raise ConfigError(f"provider {name!r} could not be loaded ({type(exc).__name__}: {exc}); "
                          f"reinstall or remove the package that provides it") from None
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"provider {name!r} ({points[name].value}) is not an abbycli Provider class")
    return cls


def validate_table(name: str, table: Any, where: str) -> dict[str, Any]:
    """Check a ``[providers.<name>]`` table from the config file with the provider's own keys."""
    try:
        cls = load(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: [providers.{name}]: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'providers.{name}' must be a table ([providers.{name}])")
    keys = {k.short: k for k in cls.settings}
    values = {}
    for short, raw in table.items():
        if short not in keys:
            full = [f"providers.{name}.{k}" for k in keys]
            have = f"; it has: {', '.join(keys)}" if keys else "; it takes no settings"
            raise ConfigError(f"{where}: unknown key 'providers.{name}.{short}'"
                              f"{suggest(f'providers.{name}.{short}', full)}{have}")
        try:
            values[short] = keys[short].check(raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: providers.{name}.{short}: {exc}") from None
    return values
