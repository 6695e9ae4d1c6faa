"""abby: a quota-managed image store and image generation for bots and terminals.

The bot imports the core from here; the command line lives in ``abbycli.cli``.
Importing this package stays cheap: heavy libraries load where they are used.
"""

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
from .storage.manager import CheckReport, CleanupReport, StorageManager, StoredImage
from .storage.quota import Limits, QuotaManager, Reservation

__version__ = "0.1.0"

__all__ = [
    "AbbyError", "Busy", "CheckReport", "CleanupReport", "ConfigError", "DailyLimitReached",
    "GlobalQuotaExceeded", "InvalidInput", "Limits", "NotFound", "QuotaExceeded", "QuotaManager",
    "Reservation", "Settings", "StorageError", "StorageManager", "StoredImage", "UserQuotaExceeded",
    "load_settings", "__version__",
]
