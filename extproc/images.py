"""Images a prompt carries inline, read just far enough to send them to ``ApplyGuardrail``.

Owns: the ``data:`` URL parser (RFC 2397: base64, or percent-encoded bytes), the bounded
base64 decoder (refusing what decoders disagree on), the format sniffer (magic bytes; the
declared media type is never trusted) and the header readers for the dimensions (PNG
``IHDR``; JPEG start-of-frame markers, walking the segments) and a PNG chunk walk (lengths
and CRCs up to ``IEND``). Pixels are never decoded: an image bomb (a small file claiming
huge dimensions) is refused from its header, and no input makes these functions read past
their argument, loop without advancing, or allocate more than the size bound.

Bedrock's limits for image content blocks (AWS, "Block harmful images with content filters",
docs.aws.amazon.com/bedrock/latest/userguide/guardrails-mmfilter.html): PNG and JPEG only, at
most 4 MB an image, 8000x8000 pixels, 20 images a request, 25 images a second (a quota that
cannot be raised).

Pure: no I/O, no logging. ``ImageRefused.reason`` says why an image cannot be checked; what
that means for the request (``--unchecked-images``) is the caller's.
"""

from __future__ import annotations

import binascii
import enum
import struct
import zlib
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote_to_bytes

#: Bedrock's limits (see the module docstring).
MAX_IMAGE_BYTES: Final = 4 * 1024 * 1024
MAX_DIMENSION: Final = 8000
MAX_IMAGES_PER_CALL: Final = 20
#: The formats ``ApplyGuardrail`` reads (``GuardrailImageBlock.format``).
CHECKABLE: Final = frozenset({"png", "jpeg"})

PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
#: JPEG start-of-frame markers (ITU T.81 table B.1): every SOFn but DHT (C4), JPG (C8), DAC (CC).
_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                         0xCF})
#: JPEG markers without a length (T.81 B.1.1.3): TEM, RST0-7, SOI.
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
_BASE64_CLEAN: Final = bytes.maketrans(b"-_", b"+/")
_WHITESPACE: Final = b" \t\r\n\f\v"


class Reason(enum.Enum):
    """Why an image cannot be checked."""

    REFERENCE = "reference"  # a remote URL or a file id: the sidecar fetches nothing
    FORMAT = "format"  # not PNG or JPEG (GIF, WebP, anything else)
    TOO_LARGE = "too_large"  # over the byte limit, or dimensions over 8000 pixels
    UNREADABLE = "unreadable"  # not base64, not a data URL, a header that does not parse


class ImageRefused(ValueError):
    """The image cannot be checked; ``reason`` says why (``detail`` for logs only)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Inspected:
    """A checkable image: its sniffed format, dimensions and bytes."""

    format: str  # "png" | "jpeg"
    width: int
    height: int
    data: bytes = field(repr=False)


def sniff(data: bytes) -> str | None:
    """The format by magic bytes: ``png``, ``jpeg``, ``gif``, ``webp``, or None."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the PNG's first chunk, which must be ``IHDR`` of 13 bytes."""
    if len(data) < 24 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_intact(data: bytes) -> bool:
    """Whether the PNG's chunks run whole from the signature to ``IEND``, each within the
    data and with its CRC right (what a decoder checks first; the pixels are not inflated)."""
    pos, end = 8, len(data)
    view = memoryview(data)
    while pos + 12 <= end:
        (length,) = struct.unpack(">I", view[pos:pos + 4])
        stop = pos + 8 + length
        if stop + 4 > end:
            return False
        (crc,) = struct.unpack(">I", view[stop:stop + 4])
        if zlib.crc32(view[pos + 4:stop]) != crc:
            return False
        if data[pos + 4:pos + 8] == b"IEND":
            return True
        pos = stop + 4
    return False


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first start-of-frame segment, walking the marker segments
    from the start (each step advances at least two bytes; a truncated or malformed segment,
    or the scan or the end before any frame header, is None)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    end = len(data)
    pos = 2
    while pos < end:
        if data[pos] != 0xFF:
            return None
        while pos < end and data[pos] == 0xFF:  # fill bytes (T.81 B.1.1.2)
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        if pos + 2 > end:
            return None
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            return None
        if marker in _SOF:
            if length < 7 or pos + 7 > end:
                return None
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return width, height
        pos += length
    return None


def inspect(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> Inspected:
    """``data`` as a checkable image, or ``ImageRefused``: empty, over ``max_bytes``, not PNG
    or JPEG, a header without dimensions, a dimension of 0 or over ``MAX_DIMENSION``, a PNG
    whose chunks do not run whole to ``IEND`` (a JPEG is read up to its frame header only:
    bytes after the end of the image are common and harmless)."""
    if not data:
        raise ImageRefused(Reason.UNREADABLE, "no image bytes")
    if len(data) > max_bytes:
        raise ImageRefused(Reason.TOO_LARGE, f"{len(data)} bytes, over {max_bytes}")
    fmt = sniff(data)
    if fmt is None:
        raise ImageRefused(Reason.UNREADABLE, "not an image format we know")
    if fmt not in CHECKABLE:
        raise ImageRefused(Reason.FORMAT, f"{fmt} cannot be checked (PNG and JPEG only)")
    size = png_size(data) if fmt == "png" else jpeg_size(data)
    if size is None:
        raise ImageRefused(Reason.UNREADABLE, f"{fmt} header without dimensions")
    width, height = size
    if width == 0 or height == 0:
        raise ImageRefused(Reason.UNREADABLE, f"{fmt} of {width}x{height} pixels")
    if width > MAX_DIMENSION or height > MAX_DIMENSION:
        raise ImageRefused(Reason.TOO_LARGE, f"{width}x{height} pixels, over "
                           f"{MAX_DIMENSION}x{MAX_DIMENSION}")
    if fmt == "png" and not png_intact(data):
        raise ImageRefused(Reason.UNREADABLE, "png chunks truncated or corrupt")
    return Inspected(fmt, width, height, data)


def decode_base64(text: str, max_bytes: int = MAX_IMAGE_BYTES, url_safe: bool = False) -> bytes:
    """Base64 as the upstream APIs take it: whitespace ignored, padding optional; refused
    before decoding when the encoded length already says more than ``max_bytes``. Any other
    character is ``UNREADABLE``: Python's default decoder (vLLM's, many proxies') skips it
    and decodes other bytes than the sidecar would, so the guardrail would check another
    image than the model sees. So are the URL-safe ``-`` and ``_`` unless ``url_safe`` (an
    API whose decoder takes that alphabet: Gemini's protobuf JSON bytes), and a text mixing
    both alphabets always (no decoder reads it as one)."""
    # Three bytes per four characters: a bound from the length alone, whitespace allowed for
    # (a line break every 64 characters at most doubles nothing; twice the bound is generous).
    bound = (max_bytes + 2) // 3 * 4
    if len(text) > 2 * bound + 64:
        raise ImageRefused(Reason.TOO_LARGE, f"{len(text)} base64 characters")
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ImageRefused(Reason.UNREADABLE, "base64 with a non-ASCII character") from None
    if b"-" in raw or b"_" in raw:
        if not url_safe:
            raise ImageRefused(Reason.UNREADABLE, "URL-safe base64 where the API reads the "
                               "standard alphabet")
        if b"+" in raw or b"/" in raw:
            raise ImageRefused(Reason.UNREADABLE, "base64 mixing both alphabets")
        raw = raw.translate(_BASE64_CLEAN)
    raw = raw.translate(None, _WHITESPACE)
    raw = raw.rstrip(b"=")
    if len(raw) > bound:
        raise ImageRefused(Reason.TOO_LARGE, f"{len(raw)} base64 characters")
    if len(raw) % 4 == 1:
        raise ImageRefused(Reason.UNREADABLE, "base64 of an impossible length")
    raw += b"=" * (-len(raw) % 4)
    try:
        data = binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error:
        raise ImageRefused(Reason.UNREADABLE, "not base64") from None
    if len(data) > max_bytes:
        raise ImageRefused(Reason.TOO_LARGE, f"{len(data)} bytes, over {max_bytes}")
    return data


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def parse_data_url(url: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a ``data:`` URL (RFC 2397): ``;base64`` data decoded as ``decode_base64``
    does (a percent-escape in it is ``UNREADABLE``: a browser undoes it, an API's base64
    decoder refuses it or skips the ``%`` and reads the hex digits as base64), other data
    percent-decoded (raw non-ASCII characters are ``UNREADABLE``); the media type is not
    read (the bytes are sniffed)."""
    if not is_data_url(url):
        raise ImageRefused(Reason.REFERENCE, "not a data URL")
    comma = url.find(",")
    if comma < 0:
        raise ImageRefused(Reason.UNREADABLE, "a data URL without a comma")
    header, payload = url[5:comma], url[comma + 1:]
    if header.rstrip().lower().endswith(";base64"):
        if "%" in payload:
            raise ImageRefused(Reason.UNREADABLE, "percent-escapes in base64")
        return decode_base64(payload, max_bytes)
    if not payload.isascii():
        # Latin-1 bytes to one reader, UTF-8 bytes to a URL decoder: not guessed.
        raise ImageRefused(Reason.UNREADABLE, "a data URL with raw non-ASCII characters")
    if "%" in payload:
        if len(payload) > 3 * (2 * max_bytes + 64):
            raise ImageRefused(Reason.TOO_LARGE, f"{len(payload)} characters")
        decoded = unquote_to_bytes(payload)
        if len(decoded) > max_bytes:
            raise ImageRefused(Reason.TOO_LARGE, f"{len(decoded)} bytes, over {max_bytes}")
        return decoded
    if len(payload) > max_bytes:
        raise ImageRefused(Reason.TOO_LARGE, f"{len(payload)} characters, over {max_bytes}")
    return payload.encode("ascii")
