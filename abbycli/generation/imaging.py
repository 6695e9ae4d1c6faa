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
import struct
import zlib
from typing import Any
from html import escape, unescape  # xml.sax.saxutils would pull in urllib and http.client

from ..errors import InvalidInput, MalformedResponse
from ..storage.formats import sniff_format

_XMP_NS = b"http://ns.adobe.com/xap/1.0/\x00"


def inspect(data: bytes, *, from_provider: bool = False) -> tuple[str, int, int]:
    """(format, width, height) of a PNG, JPEG or WebP, fully decoded to prove it is whole."""
    error = MalformedResponse if from_provider else InvalidInput
    who = "the API returned" if from_provider else "the input is"
    fmt = sniff_format(data)
    if fmt is None:
        raise error(f"{who} not a PNG, JPEG or WebP image" + (f" ({len(data)} bytes)" if from_provider else ""))
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: a truncated or corrupt file fails here
            return fmt, img.width, img.height
    except Exception as exc:  # Pillow raises many types for broken data
        raise error(f"{who} a damaged {fmt.upper()} image: {exc}") from None


def size_of(data: bytes) -> tuple[int, int]:
    """Width and height from the header alone, for images ``inspect`` has already proved whole."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


def resize(data: bytes, width: int, height: int, fmt: str) -> bytes:
    """Resample to exactly width x height with LANCZOS, encoded as ``fmt``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") and fmt != "jpeg" else "RGB")
        out = img.resize((width, height), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, _PIL_FORMAT[fmt], **_SAVE_OPTIONS[fmt])
        return buf.getvalue()


_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
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
