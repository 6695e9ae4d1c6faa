"""abby: a quota-managed image store and image generation for bots and terminals.

The bot imports the core from here; the command line lives in ``abbycli.cli``.
Importing this package stays cheap: heavy libraries load where they are used.
"""

__version__ = "0.1.0"  # first, because submodules read it

import logging

# A library logs to the "abby" logger and leaves handlers to the application
# (the CLI adds a rotating file); without this, Python would print warnings to stderr.
logging.getLogger("abby").addHandler(logging.NullHandler())

# Every public name, with the module that defines it. They load on first use
# (PEP 562), so `import abbycli` costs almost nothing: a bot that only stores
# images never loads the generation code, and the command line can catch a
# Ctrl-C from its very first moment.
_EXPORTS = {
    "Settings": "config", "load_settings": "config",
    "StorageManager": "storage.manager", "StoredImage": "storage.manager",
    "CheckReport": "storage.manager", "CleanupReport": "storage.manager",
    "Limits": "storage.quota", "QuotaManager": "storage.quota", "Reservation": "storage.quota",
    "ImageGenerator": "generation.generator",
    "ImageRequest": "generation.request", "GeneratedImage": "generation.request",
    **{name: "errors" for name in (
        "AbbyError", "ApiRejected", "AuthError", "Busy", "ConfigError", "ContentFiltered", "DailyLimitReached",
        "FileInUse", "GlobalQuotaExceeded", "InsufficientCredits", "InvalidInput", "NotFound", "ProviderError",
        "ProviderUnavailable", "QuotaExceeded", "RateLimited", "ReadOnlyStore", "StorageError",
        "UserQuotaExceeded")},
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'abbycli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
