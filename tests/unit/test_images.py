"""extproc.images: data URLs, bounded base64, format sniffing, header dimensions, bombs."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.images import (
    MAX_DIMENSION,
    ImageRefused,
    Reason,
    decode_base64,
    inspect,
    jpeg_size,
    parse_data_url,
    png_size,
    sniff,
)
from testkit.images import GIF, b64, data_url, jpeg, png


def refused(reason: Reason, call: object, *args: object, **kwargs: object) -> None:
    assert callable(call)
    with pytest.raises(ImageRefused) as info:
        call(*args, **kwargs)
    assert info.value.reason is reason


def test_png_and_jpeg_are_sniffed_and_sized_from_their_headers() -> None:
    image = inspect(png(3, 5))
    assert (image.format, image.width, image.height) == ("png", 3, 5)
    image = inspect(jpeg(640, 480, padding=70_000))  # the frame header after a long comment
    assert (image.format, image.width, image.height) == ("jpeg", 640, 480)


def test_the_declared_media_type_is_not_trusted() -> None:
    data = parse_data_url(data_url(png(), "image/gif"))
    assert inspect(data).format == "png"


@pytest.mark.parametrize(("data", "fmt"), [
    (GIF, "gif"), (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "webp")])
def test_gif_and_webp_are_recognised_and_refused(data: bytes, fmt: str) -> None:
    assert sniff(data) == fmt
    refused(Reason.FORMAT, inspect, data)


def test_an_image_bomb_is_refused_from_its_header() -> None:
    bomb = png(1, 1, claimed=(100_000, 100_000))
    assert len(bomb) < 100
    refused(Reason.TOO_LARGE, inspect, bomb)
    refused(Reason.TOO_LARGE, inspect, png(1, 1, claimed=(MAX_DIMENSION + 1, 1)))
    assert inspect(png(1, 1, claimed=(MAX_DIMENSION, MAX_DIMENSION))).width == MAX_DIMENSION
    refused(Reason.TOO_LARGE, inspect, jpeg(65535, 65535))


def test_zero_dimensions_and_truncated_headers_are_unreadable() -> None:
    refused(Reason.UNREADABLE, inspect, png(1, 1, claimed=(0, 5)))
    refused(Reason.UNREADABLE, inspect, png()[:20])
    refused(Reason.UNREADABLE, inspect, jpeg()[:26])  # the frame header cut
    refused(Reason.UNREADABLE, inspect, b"")
    refused(Reason.UNREADABLE, inspect, b"hello, not an image")


def test_a_png_whose_chunks_do_not_run_whole_to_iend_is_unreadable() -> None:
    data = png(8, 8)
    refused(Reason.UNREADABLE, inspect, data[:40])  # the header is whole, the rest cut
    corrupt = bytearray(data)
    corrupt[-20] ^= 0xFF  # a byte of the IDAT chunk: its CRC no longer matches
    refused(Reason.UNREADABLE, inspect, bytes(corrupt))
    assert inspect(data).format == "png"


def test_a_jpeg_scan_before_any_frame_header_has_no_size() -> None:
    assert jpeg_size(b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 10) is None
    assert jpeg_size(b"\xff\xd8\xff\xe0\x00\x01") is None  # a length below 2 never loops


def test_over_the_byte_limit_is_refused_before_decoding() -> None:
    data = png(64, 64)
    refused(Reason.TOO_LARGE, inspect, data, len(data) - 1)
    # The encoded length alone says too much: refused without decoding.
    refused(Reason.TOO_LARGE, decode_base64, "A" * 10_000, 100)
    refused(Reason.TOO_LARGE, parse_data_url, "data:image/png;base64," + "A" * 10_000, 100)


def test_base64_is_read_as_leniently_as_the_apis_take_it() -> None:
    data = png(7, 7, seed=3)
    plain = base64.b64encode(data).decode()
    assert decode_base64(plain) == data
    assert decode_base64(plain.rstrip("=")) == data  # padding optional
    assert decode_base64(base64.urlsafe_b64encode(data).decode(), url_safe=True) == data
    wrapped = "\n".join(plain[i:i + 76] for i in range(0, len(plain), 76))
    assert decode_base64(wrapped) == data  # MIME line breaks


@pytest.mark.parametrize("text", ["ab$d", "abc=def", "a", "é" * 8])
def test_what_a_strict_upstream_would_not_decode_is_unreadable(text: str) -> None:
    refused(Reason.UNREADABLE, decode_base64, text)


def test_data_urls_base64_and_percent_encoded() -> None:
    data = png()
    assert parse_data_url(data_url(data)) == data
    assert parse_data_url("DATA:image/png;BASE64," + b64(data)) == data
    percent = "".join(f"%{byte:02X}" for byte in data)
    assert parse_data_url("data:image/png," + percent) == data
    refused(Reason.REFERENCE, parse_data_url, "https://example.com/cat.png")
    refused(Reason.UNREADABLE, parse_data_url, "data:image/png;base64")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_readers(data: bytes) -> None:
    for candidate in (data, b"\x89PNG\r\n\x1a\n" + data, b"\xff\xd8" + data,
                      b"\xff\xd8\xff" + data):
        try:
            image = inspect(candidate)
        except ImageRefused:
            continue
        assert 0 < image.width <= MAX_DIMENSION and 0 < image.height <= MAX_DIMENSION
        assert image.format in ("png", "jpeg")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=12))
def test_arbitrary_jpeg_segments_never_crash_or_loop(segments: list[tuple[int, bytes]]) -> None:
    data = b"\xff\xd8" + b"".join(
        b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body
        for marker, body in segments)
    size = jpeg_size(data)
    assert size is None or len(size) == 2
    assert png_size(data) is None


@settings(max_examples=400)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_url_parser(text: str) -> None:
    for url in (text, "data:" + text, "data:image/png;base64," + text):
        try:
            parse_data_url(url, 1000)
        except ImageRefused as exc:
            assert exc.reason in Reason


def test_regression_base64_a_lenient_upstream_decodes_otherwise_is_refused() -> None:
    """Base64 the sidecar and a plausible upstream decode to different bytes: the guardrail
    would check another image than the model sees. Python's default decoder (vLLM's and many
    proxies') skips the URL-safe ``-`` and ``_`` and the ``%`` of an escape (reading its hex
    digits as base64), where the sidecar read ``-`` as ``+`` and undid the escape."""
    data = png(7, 7, seed=3)
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert "-" in urlsafe or "_" in urlsafe
    assert base64.b64decode(urlsafe) != data  # what a lenient upstream shows its model
    refused(Reason.UNREADABLE, decode_base64, urlsafe)
    refused(Reason.UNREADABLE, parse_data_url, "data:image/png;base64," + urlsafe)
    escaped = b64(data).replace("+", "%2B").replace("/", "%2F")
    assert escaped != b64(data)
    refused(Reason.UNREADABLE, parse_data_url, "data:image/png;base64," + escaped)
    # Both alphabets in one text: no decoder reads it as the sidecar did.
    mixed = "ab+d" + "ab-d"
    refused(Reason.UNREADABLE, decode_base64, mixed, url_safe=True)
    # Where the API's decoder takes the URL-safe alphabet (Gemini's protobuf JSON bytes;
    # google-genai sends it), it is read.
    assert decode_base64(urlsafe, url_safe=True) == data


def test_regression_a_data_url_with_raw_non_ascii_characters_is_refused() -> None:
    """Raw (unescaped) characters over U+007F in a data URL's data: the sidecar took them as
    Latin-1 bytes, a URL decoder (the fetch standard, Python's urllib) takes their UTF-8
    bytes; the two readings differ, so neither is guessed."""
    data = png()
    raw = data.decode("latin-1")
    assert raw.encode("utf-8") != data
    refused(Reason.UNREADABLE, parse_data_url, "data:image/png," + raw)
    refused(Reason.UNREADABLE, parse_data_url, "data:image/png,%89PNG" + raw[4:])
