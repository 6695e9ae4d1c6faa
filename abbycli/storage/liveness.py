"""Is the process that owns a temp file or a reservation still running?

A save writes ``temp/<pid>-….part`` and a paid generation holds a reservation
row with its pid and host. When that process dies (SIGKILL, a crashed bot, a
power cut) nobody finishes them, so abby reclaims them: at once when the owner
is known to be gone (same host, pid not running), otherwise after
``STALE_AFTER_SECONDS``, which stays above the longest legitimate request
(``generation.upscale_timeout`` is capped well below it).

A pid can be reused by a new process; then the entry looks alive and falls
back to the age limit, which is the safe side (slots are held, never lost).
"""

from __future__ import annotations

import os
import socket

STALE_AFTER_SECONDS = 3600


def pid_alive(pid: int) -> bool | None:
    """True/False when the OS can tell; None when it cannot."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return None
    return True


def _windows_pid_alive(pid: int) -> bool | None:
    # os.kill(pid, 0) would *terminate* the process on Windows: ask the kernel instead.
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    process_query_limited_information, still_active = 0x1000, 259
    error_access_denied, error_invalid_parameter = 5, 87

    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        error = ctypes.get_last_error()
        if error == error_invalid_parameter:
            return False  # no such process
        return True if error == error_access_denied else None
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return None
        # A process that exited but whose handle someone still holds reports its exit code.
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def abandoned(pid: int | None, host: str | None, created: float, now: float) -> bool:
    """Whether an entry made by ``pid`` on ``host`` at ``created`` can be reclaimed."""
    if now - created > STALE_AFTER_SECONDS:
        return True
    if pid is None or (host is not None and host != socket.gethostname()):
        return False
    return pid_alive(pid) is False
