"""The frames between the sidecar and its guardrail call process (``extproc.guardrail.parent``
and ``extproc.guardrail.child``): a 4-byte big-endian length and a JSON object.

* hello (child, once): ``{"hello": {"endpoint_url": ..., "region": ...}}`` or
  ``{"fatal": "message"}``;
* request: ``{"id": n, "guardrail": id, "version": v, "source": "INPUT"|"OUTPUT",
  "texts": [...]}``, each text a string and each image ``{"image": {"format": "png"|"jpeg",
  "b64": <the bytes in base64>}}`` (``encode_content``, ``decode_content``);
* answer: ``{"id": n, "ok": <the ApplyGuardrail response without ResponseMetadata>}`` or
  ``{"id": n, "error": <GuardrailError class name>, "message": ...}``;
* stop (parent, on close): ``{"stop": true}``.

Imports neither side, and no boto3.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

from extproc.domain.client import Content, ImageBlock
from extproc.domain.errors import (
    GuardrailError,
    GuardrailInputTooLarge,
    GuardrailRejected,
    GuardrailServerError,
    GuardrailThrottled,
    GuardrailTimeout,
)

HEADER = struct.Struct(">I")
#: Largest frame either side accepts (an ApplyGuardrail request is at most a few MB of text).
MAX_FRAME = 64 * 1024 * 1024
ERROR_CLASSES: dict[str, type[GuardrailError]] = {
    cls.__name__: cls for cls in (GuardrailTimeout, GuardrailThrottled, GuardrailServerError,
                                  GuardrailRejected, GuardrailInputTooLarge)
}


def encode_content(content: Sequence[Content]) -> list[Any]:
    """A call's content blocks as JSON values: texts as they are, images in base64."""
    return [item if isinstance(item, str) else
            {"image": {"format": item.format, "b64": base64.b64encode(item.data).decode()}}
            for item in content]


def decode_content(items: Any) -> list[Content]:
    """``encode_content``'s values back; ``ValueError`` for anything else."""
    if not isinstance(items, list):
        raise ValueError("content is not a list")
    content: list[Content] = []
    for item in items:
        if isinstance(item, str):
            content.append(item)
            continue
        image = item.get("image") if isinstance(item, dict) else None
        if not isinstance(image, dict) or not isinstance(image.get("b64"), str):
            raise ValueError("a content block is neither a text nor an image")
        try:
            data = base64.b64decode(image["b64"], validate=True)
        except binascii.Error as exc:
            raise ValueError("an image block is not base64") from exc
        content.append(ImageBlock(str(image.get("format")), data))
    return content


def frame(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":"), default=str).encode()
    return HEADER.pack(len(data)) + data


def error_from(name: str, message: str) -> GuardrailError:
    """The parent's exception for a child's ``error`` answer (unknown names: server_error)."""
    return ERROR_CLASSES.get(name, GuardrailServerError)(message)


def error_answer(call_id: Any, error: GuardrailError) -> dict[str, Any]:
    """The child's answer for a call that failed with ``error``."""
    return {"id": call_id, "error": type(error).__name__, "message": str(error)}


def read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(size - len(chunks))
        if not data:
            raise ConnectionError("end of file")
        chunks += data
    return bytes(chunks)


def read_frame_blocking(sock: socket.socket) -> dict[str, Any]:
    """One frame from a blocking socket; ``ValueError`` for a frame that is not an object."""
    (size,) = HEADER.unpack(read_exactly(sock, HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    message = json.loads(read_exactly(sock, size))
    if not isinstance(message, dict):
        raise ValueError("frame is not an object")
    return message
