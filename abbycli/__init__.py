"""abby: a quota-managed image store and image generation for bots and terminals.

The bot imports the core from here; the command line lives in ``abbycli.cli``.
Importing this package stays cheap: heavy libraries load where they are used.
"""

__version__ = "0.1.0"  # first, because submodules read it

import logging

# A library logs to the "abby" logger and leaves handlers to the application
# (the CLI adds a rotating file); without this, Python would print warnings to stderr.
logging.getLogger("abby").addHandler(logging.NullHandler())

from .config import Settings, load_settings
from .errors import (
    AbbyError,
    Busy,
    ConfigError,
    DailyLimitReached,
    FileInUse,
    GlobalQuotaExceeded,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    ReadOnlyStore,
    StorageError,
    UserQuotaExceeded,
)
from .errors import (
    ApiRejected,
    AuthError,
    ContentFiltered,
    InsufficientCredits,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from .storage.manager import CheckReport, CleanupReport, StorageManager, StoredImage
from .storage.quota import Limits, QuotaManager, Reservation


__all__ = [
    "AbbyError", "ApiRejected", "AuthError", "Busy", "ContentFiltered", "GeneratedImage", "ImageGenerator",
    "ImageRequest", "InsufficientCredits", "ProviderError", "ProviderUnavailable", "RateLimited", "CheckReport", "CleanupReport", "ConfigError", "DailyLimitReached", "FileInUse",
    "GlobalQuotaExceeded", "InvalidInput", "Limits", "NotFound", "QuotaExceeded", "QuotaManager",
    "ReadOnlyStore", "Reservation", "Settings", "StorageError", "StorageManager", "StoredImage", "UserQuotaExceeded",
    "load_settings", "__version__",
]


def __getattr__(name: str):
    # The generation classes load on first use, so admin commands and a bot
    # that only stores images never pay for them.
    if name == "ImageGenerator":
        from .generation.generator import ImageGenerator

        return ImageGenerator
    if name in ("ImageRequest", "GeneratedImage"):
        from .generation import request

        return getattr(request, name)
    raise AttributeError(f"module 'abbycli' has no attribute {name!r}")
