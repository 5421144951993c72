"""The images of a prompt: where each API puts them, and what each one is.

``find_images`` walks a parsed request body and returns every image part it holds, wherever
it is (a message's content, a tool result's content, a Responses input item's content):

===========================  ==================================================================
API                          image part
===========================  ==================================================================
OpenAI Chat Completions      ``{"type": "image_url", "image_url": {"url": ...}}`` (a ``data:``
                             URL or a remote URL; the bare-string ``image_url`` too; vLLM's
                             ``{"image_url": ...}`` without a ``type``)
OpenAI Responses             ``{"type": "input_image", "image_url": ...}`` (``data:`` or
                             remote) or ``{"type": "input_image", "file_id": ...}`` (a
                             ``file_id`` beside an ``image_url`` makes it a reference)
OpenAI file parts            ``{"type": "file", "file": {"file_data": ...}}`` and
                             ``{"type": "input_file", "file_data": ...}`` whose ``data:`` URL
                             declares an ``image/*`` type (other files are not images)
Anthropic Messages           ``{"type": "image", "source": {"type": "base64", "data": ...}}``,
                             ``source`` of type ``url`` or ``file``
Other ``image`` parts         ``{"type": "image", ...}`` with ``image``, ``url`` (a ``data:`` or
                             remote URL), ``base64`` or ``data`` (base64) beside the type
                             (Hugging Face chat templates, MCP content)
Google Gemini                ``{"inlineData": {"mimeType": "image/...", "data": ...}}`` (base64;
                             ``inline_data`` / ``mime_type`` too), ``fileData`` of an image
                             type (a reference)
Bedrock Converse             ``{"image": {"format": ..., "source": {"bytes": ...}}}`` (base64
                             in JSON), ``source.s3Location`` (a reference)
Ollama                       ``"images": [base64, ...]`` of a message or ``/api/generate``
===========================  ==================================================================

Parts are recognised by their ``type`` or their key alone, in any format's body: an image part
put where a format does not expect one is still an image a lenient upstream may show its
model. Gemini blobs of other media types (audio, video, PDF) are not images: they are not
read (README, "What is not checked"). ``resolve``
turns a part into a checkable image (``extproc.images``) or says why it is not one. Pure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from extproc.images import (
    MAX_IMAGE_BYTES,
    ImageRefused,
    Inspected,
    Reason,
    decode_base64,
    inspect,
    is_data_url,
    parse_data_url,
)

DATA_URL: Final = "data_url"
BASE64: Final = "base64"
URL: Final = "url"
FILE: Final = "file"
UNKNOWN: Final = "unknown"  # an image part of a shape not read: refused as unreadable

#: Image part types whose image the guardrail cannot be given: vLLM's precomputed embeddings
#: and in-process images (the model would read an image unchecked).
_UNREAD_TYPES: Final = frozenset({"image_embeds", "image_pil"})


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image of a prompt: ``kind`` (``DATA_URL``, ``BASE64``, ``URL``, ``FILE``,
    ``UNKNOWN``) and its
    value (never logged)."""

    kind: str
    value: str = field(repr=False)
    #: base64 whose API takes the URL-safe alphabet too (Gemini's protobuf JSON bytes)
    url_safe: bool = False


def _url_part(url: Any) -> ImagePart | None:
    if not isinstance(url, str):
        return None
    return ImagePart(DATA_URL if is_data_url(url) else URL, url)


def _is_image_data_url(url: str) -> bool:
    """A ``data:`` URL declaring an image media type (a file part holding an image)."""
    return is_data_url(url) and url[5:5 + 64].lstrip().lower().startswith("image/")


def _untyped(node: dict[str, Any]) -> ImagePart | None:
    """vLLM's parts without a ``type`` (it infers the type from the one key they have)."""
    if node.keys() <= {"image_url", "uuid"} and "image_url" in node:
        image_url = node["image_url"]
        if node.get("uuid") is not None:
            return ImagePart(FILE, "uuid")
        return _url_part(image_url.get("url") if isinstance(image_url, dict) else image_url)
    if len(node) == 1 and node.keys() & _UNREAD_TYPES:
        return ImagePart(UNKNOWN, "")
    return None


def _part(node: dict[str, Any]) -> ImagePart | None:
    kind = node.get("type")
    if kind is None:
        return _untyped(node)
    if kind == "image_url":
        image_url = node.get("image_url")
        uuid = node.get("uuid", image_url.get("uuid") if isinstance(image_url, dict) else None)
        if uuid is not None:
            # vLLM's multimodal uuid: it may show the image cached under it, not this one
            return ImagePart(FILE, "uuid")
        part = _url_part(image_url.get("url") if isinstance(image_url, dict) else image_url)
        return part if part is not None else ImagePart(UNKNOWN, "")
    if kind == "input_image":
        file_id = node.get("file_id")
        if file_id is not None:  # a file, even beside an inline image an upstream may ignore
            return ImagePart(FILE, file_id if isinstance(file_id, str) else "")
        image_url = node.get("image_url")
        if isinstance(image_url, dict):
            image_url = image_url.get("url")
        if isinstance(image_url, str):
            return _url_part(image_url)
        return ImagePart(UNKNOWN, "")
    if kind == "image":
        source = node.get("source")
        if source is None:  # the image beside the type (chat templates, MCP content)
            for key in ("image", "url", "image_url"):
                if isinstance(node.get(key), str):
                    return _url_part(node[key])
            for key in ("base64", "data"):
                if isinstance(node.get(key), str):
                    return ImagePart(BASE64, node[key])
            return None
        if not isinstance(source, dict):
            return ImagePart(UNKNOWN, "")
        source_type = source.get("type")
        if source_type == "base64" and isinstance(source.get("data"), str):
            return ImagePart(BASE64, source["data"])
        if source_type == "url":
            return _url_part(source.get("url")) or ImagePart(UNKNOWN, "")
        if source_type == "file" and isinstance(source.get("file_id"), str):
            return ImagePart(FILE, source["file_id"])
        return ImagePart(UNKNOWN, "")
    if kind in ("file", "input_file"):
        holder = node.get("file") if kind == "file" else node
        data = holder.get("file_data") if isinstance(holder, dict) else None
        if isinstance(data, str) and _is_image_data_url(data):
            return ImagePart(DATA_URL, data)
        return None
    if kind == "image_generation_call":  # Responses: a generated image given back as input
        result = node.get("result")
        return ImagePart(BASE64, result) if isinstance(result, str) and result else None
    if isinstance(kind, str) and kind in _UNREAD_TYPES:
        return ImagePart(UNKNOWN, "")
    return None


def _is_image_type(blob: dict[str, Any]) -> bool:
    mime = blob.get("mimeType", blob.get("mime_type"))
    return isinstance(mime, str) and mime.strip().lower().startswith("image/")


def _keyed(node: dict[str, Any]) -> Iterator[ImagePart]:
    """The image parts an object holds under a key (Gemini, Bedrock Converse, Ollama)."""
    for key in ("inlineData", "inline_data"):
        blob = node.get(key)
        if isinstance(blob, dict) and _is_image_type(blob) and isinstance(blob.get("data"), str):
            yield ImagePart(BASE64, blob["data"], url_safe=True)
    for key in ("fileData", "file_data"):
        blob = node.get(key)
        # an image type, or none (optional: the File API knows the file's type)
        if isinstance(blob, dict) and (_is_image_type(blob) or not isinstance(
                blob.get("mimeType", blob.get("mime_type")), str)):
            uri = blob.get("fileUri", blob.get("file_uri"))
            yield ImagePart(URL, uri if isinstance(uri, str) else "")
    image = node.get("image")
    source = image.get("source") if isinstance(image, dict) else None
    if isinstance(source, dict):
        if isinstance(source.get("bytes"), str):
            yield ImagePart(BASE64, source["bytes"])
        elif source:
            yield ImagePart(FILE, "s3Location" if "s3Location" in source else "source")
    images = node.get("images")
    if isinstance(images, list):
        for item in images:
            if isinstance(item, str) and item:
                yield ImagePart(BASE64, item)


def _walk(node: Any) -> Iterator[ImagePart]:
    if isinstance(node, dict):
        part = _part(node)
        if part is not None:
            yield part
        if "inlineData" in node or "inline_data" in node or "fileData" in node \
                or "file_data" in node or "image" in node or "images" in node:
            yield from _keyed(node)
        for value in node.values():
            if isinstance(value, (dict, list)):
                yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                yield from _walk(item)


def find_images(request: Any) -> list[ImagePart]:
    """Every image part of a parsed request body, in document order."""
    return list(_walk(request))


def resolve(part: ImagePart, max_bytes: int = MAX_IMAGE_BYTES) -> Inspected:
    """The image of ``part`` (decoded, sniffed, its header read), or ``ImageRefused``: a
    remote URL or a file id is a ``REFERENCE`` (the sidecar fetches nothing)."""
    if part.kind == DATA_URL:
        return inspect(parse_data_url(part.value, max_bytes), max_bytes)
    if part.kind == BASE64:
        return inspect(decode_base64(part.value, max_bytes, part.url_safe), max_bytes)
    if part.kind == UNKNOWN:
        raise ImageRefused(Reason.UNREADABLE, "an image part of a shape not read")
    raise ImageRefused(Reason.REFERENCE, f"an image by {part.kind}")
