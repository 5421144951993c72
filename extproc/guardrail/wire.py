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

With the lean client (``extproc.guardrail.lean``) the request and the successful answer are
binary, so that the request body is built once (in the parent) and the answer parsed once (in
the parent, into the verdict); errors stay JSON answers:

* raw request: ``b"Q"``, the id and the path's length (``>QH``), the path, the ApplyGuardrail
  request body;
* raw answer: ``b"R"``, the id (``>Q``), the ApplyGuardrail answer body as received.

A JSON frame starts with ``{``, so the first byte tells them apart. The hello says which
requests the child takes: ``"client": "lean"`` or ``"boto3"``.

Imports neither side, and no boto3.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

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
RAW_REQUEST = b"Q"
RAW_ANSWER = b"R"
_REQUEST_HEAD = struct.Struct(">QH")
_ANSWER_HEAD = struct.Struct(">Q")
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


def raw_request_frame(call_id: int, path: str, body: bytes) -> bytes:
    """A lean request: the child signs and sends ``body`` to ``path`` as it is."""
    target = path.encode()
    size = 1 + _REQUEST_HEAD.size + len(target) + len(body)
    return b"".join((HEADER.pack(size), RAW_REQUEST, _REQUEST_HEAD.pack(call_id, len(target)),
                     target, body))


def read_raw_request(payload: bytes) -> tuple[int, str, bytes]:
    """(id, path, body) of a raw request payload (``ValueError`` when it is cut short)."""
    head_end = 1 + _REQUEST_HEAD.size
    if len(payload) < head_end:
        raise ValueError("raw request frame cut short")
    call_id, path_size = _REQUEST_HEAD.unpack_from(payload, 1)
    if len(payload) < head_end + path_size:
        raise ValueError("raw request frame cut short")
    return (call_id, payload[head_end:head_end + path_size].decode(),
            payload[head_end + path_size:])


def raw_answer_frame(call_id: int, body: bytes) -> bytes:
    """A successful lean answer: the ApplyGuardrail answer body, not parsed here."""
    return b"".join((HEADER.pack(1 + _ANSWER_HEAD.size + len(body)), RAW_ANSWER,
                     _ANSWER_HEAD.pack(call_id), body))


def read_raw_answer(payload: bytes) -> tuple[int, bytes]:
    """(id, body) of a raw answer payload."""
    if len(payload) < 1 + _ANSWER_HEAD.size:
        raise ValueError("raw answer frame cut short")
    (call_id,) = _ANSWER_HEAD.unpack_from(payload, 1)
    return call_id, payload[1 + _ANSWER_HEAD.size:]


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


def read_payload_blocking(sock: socket.socket) -> bytes:
    """One frame's payload from a blocking socket, JSON or raw."""
    (size,) = HEADER.unpack(read_exactly(sock, HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return read_exactly(sock, size)


def read_payload(reader: BinaryIO) -> bytes:
    """One frame's payload from a buffered reader of a blocking socket (one ``recv`` for
    several small frames); ``ConnectionError`` at the end of file."""
    head = reader.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ConnectionError("end of file")
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    payload = reader.read(size)
    if len(payload) < size:
        raise ConnectionError("end of file")
    return payload


def json_payload(payload: bytes) -> dict[str, Any]:
    """A JSON frame's object; ``ValueError`` for a frame that is not an object."""
    message = json.loads(payload)
    if not isinstance(message, dict):
        raise ValueError("frame is not an object")
    return message


def read_frame_blocking(sock: socket.socket) -> dict[str, Any]:
    """One JSON frame from a blocking socket; ``ValueError`` for a frame that is not an
    object."""
    return json_payload(read_payload_blocking(sock))
