"""Recognise and check the image formats abby stores, by their content, not their name."""

from __future__ import annotations

import io
from typing import BinaryIO

from ..errors import InvalidInput

# format -> stored extension
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' from the first bytes, or None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def verify_image(data: bytes | BinaryIO, what: str = "the data") -> tuple[str, int, int]:
    """(format, width, height) of a whole PNG, JPEG or WebP; InvalidInput otherwise.

    Every pixel is decoded, so a cut-off or corrupt file is refused before it is
    stored. The size is read from the header first: an image too large for
    Pillow's decompression-bomb limit is refused without decoding it (and
    without the warning Pillow would print). ``data`` is bytes or a binary file
    opened at its start (read in place, never all at once).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        stream: BinaryIO = io.BytesIO(data)
    else:
        stream = data
    fmt = sniff_format(stream.read(16))
    stream.seek(0)
    if fmt is None:
        raise InvalidInput(f"{what} is not a PNG, JPEG or WebP image")
    from PIL import Image

    try:
        with Image.open(stream, formats=[fmt.upper()]) as img:
            width, height = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                raise InvalidInput(f"{what} is a {width}x{height} image, more than the "
                                   f"{limit / 1e6:.0f} megapixels abby accepts")
            if fmt == "png":
                # Decoding skips the checksums of the pixel data, so a PNG whose second
                # half was overwritten (zeros, say) would decode: check every chunk's CRC.
                img.verify()
        stream.seek(0)
        if fmt == "jpeg":
            _check_jpeg_end(stream)
            stream.seek(0)
        with Image.open(stream, formats=[fmt.upper()]) as img:
            img.load()  # decodes every pixel: a truncated or corrupt file fails here
    except InvalidInput:
        raise
    except Exception as exc:  # Pillow raises many types for broken data
        reason = str(exc).split(" <", 1)[0] or type(exc).__name__  # never an object repr
        raise InvalidInput(f"{what} is a damaged {fmt.upper()} image ({reason})") from None
    return fmt, width, height


def _check_jpeg_end(stream: BinaryIO) -> None:
    """A JPEG's image data ends with the EOI marker (FF D9). libjpeg decodes a file cut
    short and padded (with zeros, say) without complaint, so look for the marker after
    the first scan starts. Inside the scan data FF is always followed by 00 or a
    restart marker, so FF D9 there can only be the real end. Data after it is ignored,
    as every reader does."""
    data = stream.read()
    scan = data.find(b"\xff\xda")
    if scan < 0 or data.find(b"\xff\xd9", scan) < 0:
        raise ValueError("it ends before its image data does")
