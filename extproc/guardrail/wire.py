"""The frames between the sidecar and its guardrail call process (``extproc.guardrail.parent``
and ``extproc.guardrail.child``): a 4-byte big-endian length and a JSON object.

* hello (child, once): ``{"hello": {"endpoint_url": ..., "region": ...}}`` or
  ``{"fatal": "message"}``;
* request: ``{"id": n, "guardrail": id, "version": v, "source": "INPUT"|"OUTPUT",
  "texts": [...]}``;
* answer: ``{"id": n, "ok": <the ApplyGuardrail response without ResponseMetadata>}`` or
  ``{"id": n, "error": <GuardrailError class name>, "message": ...}``;
* stop (parent, on close): ``{"stop": true}``.

Imports neither side, and no boto3.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

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
