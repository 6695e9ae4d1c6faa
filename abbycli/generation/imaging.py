"""Image checks, resizing and metadata, with Pillow imported only when needed.

Metadata is written into the file without re-encoding the pixels, so a
generated image is stored bit for bit as the provider made it:

* PNG: two iTXt chunks before IEND: ``parameters`` (the widely used
  "prompt / Negative prompt: / Steps: ..." text) and ``abby`` (JSON).
* JPEG: an XMP APP1 segment after SOI.
* WebP: an ``XMP `` chunk, with the VP8X header added or flagged as needed.

The XMP packet carries the same JSON in an ``abby:parameters`` property.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zlib
from typing import Any
from html import escape, unescape  # xml.sax.saxutils would pull in urllib and http.client

from ..errors import InvalidInput, MalformedResponse
from ..storage.formats import sniff_format

_XMP_NS = b"http://ns.adobe.com/xap/1.0/\x00"


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG or WebP header without decoding anything, or
    None when the header is missing or cut short. It lets a size limit be applied before
    Pillow spends memory on the pixels (a 17 KB PNG can hold 144 megapixels)."""
    fmt = sniff_format(data)
    try:
        if fmt == "png":
            if data[12:16] == b"IHDR":
                return struct.unpack(">II", data[16:24])
        elif fmt == "jpeg":
            return _jpeg_size(data)
        elif fmt == "webp":
            kind = data[12:16]
            if kind == b"VP8X":  # canvas size, stored minus one in 24 bits
                return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
            if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if kind == b"VP8L" and data[20] == 0x2F:
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    except (struct.error, IndexError):
        pass
    return None


# Start-of-frame markers carry the size; C4 (Huffman tables), C8 and CC (arithmetic coding) do not.
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: no frame header came first
            return None
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            return w, h
        pos += 2 + length
    return None


def check_size(data: bytes, max_pixels: int, name: str | None = None) -> tuple[int, int]:
    """The image's (width, height) from its header, refused with InvalidInput above ``max_pixels``
    or when the header gives no size; nothing is decoded."""
    who = name or "the input image"
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInput(f"{who} is not a PNG, JPEG or WebP image")
    size = header_size(data)
    if size is None or 0 in size:
        raise InvalidInput(f"{who} is a damaged {fmt.upper()} image (its header gives no size)")
    w, h = size
    if w * h > max_pixels:
        raise InvalidInput(f"{who} is {w}x{h} {over_limit(w * h, max_pixels)}")
    return w, h


def over_limit(pixels: int, max_pixels: int) -> str:
    """"(144 megapixels), above the limit of 40 megapixels (generation.max_megapixels)", with
    exact pixel counts when rounding would make the two numbers read the same."""
    size, limit = _megapixels(pixels), _megapixels(max_pixels)
    if size == limit:
        size, limit = f"{pixels} pixels", f"{max_pixels} pixels"
    return f"({size}), above the limit of {limit} (generation.max_megapixels)"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.2f}".rstrip("0").rstrip(".") + " megapixels"


def _open(data: bytes):
    """Pillow's Image.open on ``data``. abby applies its own pixel limit (check_size) before
    this point, so Pillow's decompression-bomb warning, which would print to the terminal,
    is silenced for the images abby already allowed (possible when max_megapixels is raised
    above Pillow's 89-megapixel threshold)."""
    from PIL import Image

    size = header_size(data)
    if Image.MAX_IMAGE_PIXELS and size and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    return Image.open(io.BytesIO(data))


def _reason(exc: Exception) -> str:
    """Why Pillow could not read an image, without the object reprs some of its messages
    carry ("cannot identify image file <_io.BytesIO object at 0x…>")."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "it cannot be decoded"
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return text or type(exc).__name__


def inspect(data: bytes, *, from_provider: bool = False, name: str | None = None) -> tuple[str, int, int]:
    """(format, width, height) of a PNG, JPEG or WebP, fully decoded to prove it is whole.
    ``name`` names an input in messages (a file name); the default is "the input image"."""
    error = MalformedResponse if from_provider else InvalidInput
    who = "the API returned" if from_provider else f"{name or 'the input image'} is"
    fmt = sniff_format(data)
    if fmt is None:
        raise error(f"{who} not a PNG, JPEG or WebP image" + (f" ({len(data)} bytes)" if from_provider else ""))
    if from_provider:
        # From the header, before a single pixel is decoded: a small file can claim billions of
        # pixels (a decompression bomb), and the store would refuse anything above this anyway.
        from PIL import Image

        size = header_size(data)
        if size is not None and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
            raise error(f"{who} a {size[0]}x{size[1]} image, more than the {_megapixels(Image.MAX_IMAGE_PIXELS)} "
                        "abby stores")
    try:
        with _open(data) as img:
            img.load()  # decodes every pixel: a truncated or corrupt file fails here
            return fmt, img.width, img.height
    except Exception as exc:  # Pillow raises many types for broken data
        raise error(f"{who} a damaged {fmt.upper()} image ({_reason(exc)})") from None


def size_of(data: bytes) -> tuple[int, int]:
    """Width and height from the header alone, for images ``inspect`` has already proved whole."""
    with _open(data) as img:
        return img.size


def resize(data: bytes, width: int, height: int, fmt: str) -> bytes:
    """Resample to exactly width x height with LANCZOS, encoded as ``fmt``."""
    from PIL import Image

    with _open(data) as img:
        img = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") and fmt != "jpeg" else "RGB")
        out = img.resize((width, height), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, _PIL_FORMAT[fmt], **_SAVE_OPTIONS[fmt])
        return buf.getvalue()


_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# The largest side each format can encode (libjpeg: 65500; WebP: 16383; PNG: 2**31 - 1).
MAX_SIDE = {"png": 2**31 - 1, "jpeg": 65_500, "webp": 16_383}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}


def parameters_text(meta: dict[str, Any]) -> str:
    """The 'parameters' text many image tools read: prompt, then negative prompt, then key: value pairs."""
    lines = [meta.get("prompt") or ""]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    pairs = [("Seed", meta.get("seed")), ("Model", meta.get("model")), ("Style", meta.get("style_preset")),
             ("Operation", meta.get("operation")), ("Provider", meta.get("provider")),
             ("Finish reason", meta.get("finish_reason"))]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def embed_metadata(data: bytes, meta: dict[str, Any]) -> bytes:
    fmt = sniff_format(data)
    payload = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    if fmt == "png":
        return _png_add_text(data, [("parameters", parameters_text(meta)), ("abby", payload)])
    if fmt == "jpeg":
        return _jpeg_add_xmp(data, _xmp_packet(payload))
    if fmt == "webp":
        return _webp_add_xmp(data, _xmp_packet(payload))
    raise InvalidInput("metadata can only be embedded in PNG, JPEG or WebP")


def read_metadata(data: bytes) -> dict[str, Any] | None:
    """The JSON abby embedded in a file, or None."""
    fmt = sniff_format(data)
    try:
        if fmt == "png":
            text = dict(_png_text_chunks(data)).get("abby")
        elif fmt in ("jpeg", "webp"):
            xmp = _jpeg_xmp(data) if fmt == "jpeg" else _webp_chunk(data, b"XMP ")
            text = _xmp_payload(xmp) if xmp else None
        else:
            return None
        return json.loads(text) if text else None
    except (ValueError, struct.error):
        return None


# --- PNG -------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_add_text(data: bytes, items: list[tuple[str, str]]) -> bytes:
    iend = data.rfind(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    if iend < 8:
        raise InvalidInput("the PNG has no IEND chunk")
    chunks = b"".join(
        # iTXt: keyword, NUL, compression flag 0, method 0, empty language, NUL, empty translation, NUL, UTF-8 text
        _png_chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + text.encode("utf-8"))
        for key, text in items
    )
    return data[:iend] + chunks + data[iend:]


def _png_text_chunks(data: bytes):
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"iTXt":
            key, rest = body.split(b"\x00", 1)
            flag = rest[0]
            _lang, _trans, text = rest[2:].split(b"\x00", 2)
            if flag == 0:
                yield key.decode("latin-1"), text.decode("utf-8")
        elif kind == b"tEXt":
            key, text = body.split(b"\x00", 1)
            yield key.decode("latin-1"), text.decode("latin-1")
        if kind == b"IEND":
            return
        pos += 12 + length


# --- XMP (JPEG, WebP) ----------------------------------------------------------------

def _xmp_packet(payload: str) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:abby="https://github.com/abby/ns/1.0/">'
        f"<abby:parameters>{escape(payload, quote=False)}</abby:parameters>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode("utf-8")


def _xmp_payload(xmp: bytes) -> str | None:
    text = xmp.decode("utf-8", errors="replace")
    start = text.find("<abby:parameters>")
    end = text.find("</abby:parameters>")
    if start < 0 or end < 0:
        return None
    return unescape(text[start + len("<abby:parameters>"):end])


def _jpeg_add_xmp(data: bytes, xmp: bytes) -> bytes:
    body = _XMP_NS + xmp
    if len(body) + 2 > 0xFFFF:
        raise InvalidInput("the metadata is too large for a JPEG segment")
    at = 2
    if data[2:4] == b"\xff\xe0":  # JFIF wants its APP0 segment first: insert after it
        at = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:at] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[at:]


def _jpeg_xmp(data: bytes) -> bytes | None:
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no more headers
            return None
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        body = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and body.startswith(_XMP_NS):
            return body[len(_XMP_NS):]
        pos += 2 + length
    return None


# --- WebP --------------------------------------------------------------------------------

def _webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunks.append((kind, data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def _webp_chunk(data: bytes, kind: bytes) -> bytes | None:
    return next((body for k, body in _webp_chunks(data) if k == kind), None)


def _webp_add_xmp(data: bytes, xmp: bytes) -> bytes:
    chunks = [(k, b) for k, b in _webp_chunks(data) if k != b"XMP "]
    if chunks and chunks[0][0] == b"VP8X":
        header = bytearray(chunks[0][1])
        header[0] |= 0x04  # XMP present
        chunks[0] = (b"VP8X", bytes(header))
    else:
        # A simple WebP: add the extended header the XMP chunk needs.
        _fmt, width, height = inspect(data)
        alpha = 0x10 if any(k == b"VP8L" and b[4] & 0x10 for k, b in chunks if len(b) > 4) else 0
        vp8x = bytes([0x04 | alpha, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        chunks.insert(0, (b"VP8X", vp8x))
    chunks.append((b"XMP ", xmp))
    body = b"WEBP" + b"".join(k + struct.pack("<I", len(b)) + b + (b"\x00" if len(b) & 1 else b"") for k, b in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body
