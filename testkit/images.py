"""Small real images for the tests and benchmarks: PNG (with optional ``tEXt`` chunks) and
JPEG built byte by byte, so that no imaging library is needed. The PNG is a valid image every
decoder reads (zlib-compressed scanlines, CRCs); the JPEG carries a real frame header and
scan but no entropy-coded pixels a decoder would render (enough for header readers and the
local guardrail, which never decode pixels)."""

from __future__ import annotations

import base64
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int = 2, height: int = 2, *, text: dict[str, str] | None = None,
        claimed: tuple[int, int] | None = None, seed: int = 0) -> bytes:
    """A grey PNG of ``width`` x ``height`` pixels; ``text``: ``tEXt`` chunks; ``claimed``:
    the dimensions the header says (an image bomb: a tiny file claiming a huge picture)."""
    cw, ch = claimed if claimed is not None else (width, height)
    ihdr = struct.pack(">IIBBBBB", cw, ch, 8, 0, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes((seed + x + y) & 0xFF for x in range(width))
                    for y in range(height))
    chunks = [_chunk(b"IHDR", ihdr)]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")))
    chunks.append(_chunk(b"IDAT", zlib.compress(rows)))
    chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def jpeg(width: int = 16, height: int = 8, *, padding: int = 0) -> bytes:
    """A JPEG's segments: SOI, APP0 (JFIF), a comment of ``padding`` bytes, SOF0 with the
    dimensions, SOS, a little scan data, EOI."""
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    parts = [b"\xff\xd8", b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0]
    remaining = padding
    while remaining > 0:
        size = min(remaining, 65533)
        parts.append(b"\xff\xfe" + struct.pack(">H", size + 2) + b"\x20" * size)
        remaining -= size
    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    parts.append(b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof)
    sos = b"\x01\x01\x00\x00\x3f\x00"
    parts.append(b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos)
    parts.append(b"\x12\x34\x56\x78\xff\xd9")
    return b"".join(parts)


GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"  # noqa: E501


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
