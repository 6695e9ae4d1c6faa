"""abby: a quota-managed image store and image generation for bots and terminals.

The bot imports the core from here; the command line lives in ``abbycli.cli``.
Importing this package stays cheap: heavy libraries load where they are used.
"""

__version__ = "0.1.0"  # first, because submodules read it

from .config import Settings, load_settings
from .errors import (
    AbbyError,
    Busy,
    ConfigError,
    DailyLimitReached,
    GlobalQuotaExceeded,
    InvalidInput,
    NotFound,
    QuotaExceeded,
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
from .generation.generator import ImageGenerator
from .generation.request import GeneratedImage, ImageRequest
from .storage.manager import CheckReport, CleanupReport, StorageManager, StoredImage
from .storage.quota import Limits, QuotaManager, Reservation


__all__ = [
    "AbbyError", "ApiRejected", "AuthError", "Busy", "ContentFiltered", "GeneratedImage", "ImageGenerator",
    "ImageRequest", "InsufficientCredits", "ProviderError", "ProviderUnavailable", "RateLimited", "CheckReport", "CleanupReport", "ConfigError", "DailyLimitReached",
    "GlobalQuotaExceeded", "InvalidInput", "Limits", "NotFound", "QuotaExceeded", "QuotaManager",
    "Reservation", "Settings", "StorageError", "StorageManager", "StoredImage", "UserQuotaExceeded",
    "load_settings", "__version__",
]
