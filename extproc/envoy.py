"""The only builder and reader of Envoy ext_proc messages.

Everything else in the package speaks plain Python (dicts of headers, bytes, booleans); this
module turns that into ``ProcessingResponse`` messages and reads ``ProcessingRequest`` headers
and what Envoy says about a stream's route (``route_facts``: ext_proc attributes, forwarded
metadata, route metadata).
Rules from ``shared/docs/ext_proc.md`` and the house style that live here:

* header values are read from ``raw_value`` first (Envoy sends ``raw_value``), and written only
  as ``raw_value``: setting both makes Envoy fail the request;
* in FULL_DUPLEX_STREAMED every body answer is a ``StreamedBodyResponse`` (a plain body
  mutation is a spurious message that resets the stream);
* a mode override spells out every body mode it wants, since an omitted body mode means NONE,
  and switching a direction to FULL_DUPLEX_STREAMED also sets that direction's trailer mode
  to SEND (Envoy rejects FULL_DUPLEX without it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2, text_format

from extproc._pb.envoy.config.core.v3 import base_pb2
from extproc._pb.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._pb.envoy.type.v3 import http_status_pb2

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
ProcessingMode = processing_mode_pb2.ProcessingMode

_SEND = ProcessingMode.SEND
_SKIP = ProcessingMode.SKIP
_NONE = ProcessingMode.NONE
_BUFFERED = ProcessingMode.BUFFERED
_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
STREAMED = ProcessingMode.STREAMED
FULL_DUPLEX = _FULL_DUPLEX

# Mode overrides; each must be listed in the filter's ``allowed_override_modes``.
# Not an LLM call: no response messages at all.
MODE_SKIP_RESPONSE = ProcessingMode(response_header_mode=_SKIP)
# LLM call whose prompt we check: buffer the request body (answered at once, checked beside
# the upstream call); keep the response headers phase.
MODE_BUFFER_REQUEST = ProcessingMode(request_body_mode=_BUFFERED)
# Non-streamed (JSON) answer: the whole body once; the response headers wait for its answer.
# BUFFERED_PARTIAL, not BUFFERED: over Envoy's buffer limit a BUFFERED answer got no response at
# all; a partial one arrives with end_of_stream false, and the overload class decides.
MODE_BUFFER_RESPONSE = ProcessingMode(response_body_mode=ProcessingMode.BUFFERED_PARTIAL)
# Streamed answer: the response body in FULL_DUPLEX_STREAMED (trailers must then be SEND).
MODE_FULL_DUPLEX_RESPONSE = ProcessingMode(
    response_body_mode=_FULL_DUPLEX, response_trailer_mode=_SEND
)


def header_map(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Envoy's ``HeaderMap`` as a dict (lower-case names; later duplicates win)."""
    result: dict[str, str] = {}
    for header in headers.headers:
        raw = header.raw_value
        result[header.key.lower()] = (
            raw.decode("utf-8", "replace") if raw else header.value
        )
    return result


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _metadata(namespace: str, values: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if not values:
        return None
    return _struct({namespace: dict(values)})


def _header_mutation(
    remove: Iterable[str] = (), set_headers: Mapping[str, str] | None = None
) -> pb.HeaderMutation | None:
    remove = list(remove)
    if not remove and not set_headers:
        return None
    options = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for name, value in (set_headers or {}).items()
    ]
    return pb.HeaderMutation(set_headers=options, remove_headers=remove)


def headers_response(
    *,
    response_phase: bool,
    remove_headers: Iterable[str] = (),
    mode: ProcessingMode | None = None,
    metadata_namespace: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> pb.ProcessingResponse:
    """Continue after a headers message, optionally removing headers and overriding modes."""
    common = pb.CommonResponse(header_mutation=_header_mutation(remove_headers))
    answer = pb.HeadersResponse(response=common)
    response = (
        pb.ProcessingResponse(response_headers=answer)
        if response_phase
        else pb.ProcessingResponse(request_headers=answer)
    )
    if mode is not None:
        response.mode_override.CopyFrom(mode)
    meta = _metadata(metadata_namespace, metadata)
    if meta is not None:
        response.dynamic_metadata.CopyFrom(meta)
    return response


def continue_request_body() -> pb.ProcessingResponse:
    """Let a BUFFERED request body through unchanged."""
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse()))


def replace_request_body(body: bytes, remove_headers: Iterable[str] = ()) -> pb.ProcessingResponse:
    """A BUFFERED request body answer that replaces the body; ``content-length`` is set to
    match (Envoy rejects a mismatch with a local 500)."""
    common = pb.CommonResponse(
        header_mutation=_header_mutation(remove_headers,
                                         set_headers={"content-length": str(len(body))}),
        body_mutation=pb.BodyMutation(body=body),
    )
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


def replace_response_body(body: bytes, *, metadata_namespace: str = "",
                          metadata: Mapping[str, Any] | None = None) -> pb.ProcessingResponse:
    """A BUFFERED response body answer that replaces the body (``content-length`` was removed
    in the headers answer)."""
    common = pb.CommonResponse(body_mutation=pb.BodyMutation(body=body))
    response = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
    meta = _metadata(metadata_namespace, metadata)
    if meta is not None:
        response.dynamic_metadata.CopyFrom(meta)
    return response


def continue_response_body(*, metadata_namespace: str = "",
                           metadata: Mapping[str, Any] | None = None) -> pb.ProcessingResponse:
    """Let a BUFFERED response body through unchanged."""
    response = pb.ProcessingResponse(
        response_body=pb.BodyResponse(response=pb.CommonResponse()))
    meta = _metadata(metadata_namespace, metadata)
    if meta is not None:
        response.dynamic_metadata.CopyFrom(meta)
    return response


def streamed_response_body(
    body: bytes,
    end_of_stream: bool,
    *,
    metadata_namespace: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> pb.ProcessingResponse:
    """A FULL_DUPLEX_STREAMED answer on the response body: ``body`` goes to the client next."""
    # One per released chunk, so the hot path: setting the leaf through the parents' attributes
    # creates each parent once, in place, about 4x cheaper than four constructors (each of which
    # builds a message and then copies it into its parent). Same bytes on the wire.
    response = pb.ProcessingResponse()
    streamed = response.response_body.response.body_mutation.streamed_response
    streamed.body = body
    streamed.end_of_stream = end_of_stream
    meta = _metadata(metadata_namespace, metadata)
    if meta is not None:
        response.dynamic_metadata.CopyFrom(meta)
    return response


def streamed_mode_body(body: bytes | None, *, pass_through: bool = False,
                      metadata_namespace: str = "",
                      metadata: Mapping[str, Any] | None = None) -> pb.ProcessingResponse:
    """A STREAMED answer to one response body chunk: the chunk unchanged (``pass_through``),
    replaced by ``body``, or cleared (``body`` empty or None)."""
    if pass_through:
        common = pb.CommonResponse()
    elif body:
        common = pb.CommonResponse(body_mutation=pb.BodyMutation(body=body))
    else:
        common = pb.CommonResponse(body_mutation=pb.BodyMutation(clear_body=True))
    response = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
    meta = _metadata(metadata_namespace, metadata)
    if meta is not None:
        response.dynamic_metadata.CopyFrom(meta)
    return response


def override_message_timeout(seconds: float) -> pb.ProcessingResponse:
    """Restart Envoy's message timer with ``seconds`` (not an answer; STREAMED only)."""
    response = pb.ProcessingResponse()
    response.override_message_timeout.FromMilliseconds(max(1, int(seconds * 1000)))
    return response


def mode_with_request_buffering(
    configured_response_body_mode: ProcessingMode.BodySendMode,
) -> ProcessingMode:
    """Buffer the request body, keeping the configured response body mode (an omitted body
    mode in an override means NONE)."""
    if configured_response_body_mode == _NONE:
        return MODE_BUFFER_REQUEST
    return ProcessingMode(request_body_mode=_BUFFERED,
                          response_body_mode=configured_response_body_mode)


def continue_trailers(*, response_phase: bool) -> pb.ProcessingResponse:
    """Let trailers through unchanged."""
    answer = pb.TrailersResponse()
    if response_phase:
        return pb.ProcessingResponse(response_trailers=answer)
    return pb.ProcessingResponse(request_trailers=answer)


def immediate_response(
    status: int,
    body: bytes,
    *,
    details: str,
    content_type: str = "application/json",
    metadata_namespace: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> pb.ProcessingResponse:
    """A local reply; only valid while the response headers have not gone out."""
    reply = pb.ImmediateResponse(
        # protobuf takes any int for an enum field; the generated stub names only the enum type
        status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
        headers=_header_mutation(set_headers={"content-type": content_type}),
        body=body,
        details=details,
    )
    response = pb.ProcessingResponse(immediate_response=reply)
    meta = _metadata(metadata_namespace, metadata)
    if meta is not None:
        response.dynamic_metadata.CopyFrom(meta)
    return response


# -- what Envoy says about a stream's route ---------------------------------------------------

#: Where Envoy files the values of ``request_attributes`` in ``ProcessingRequest.attributes``:
#: under the filter's type name, whatever the filter instance is called (ext_proc.cc,
#: ``Filter::addAttributes``; Envoy Gateway names its instances
#: ``envoy.filters.http.ext_proc/<policy>``, the key stays this).
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
#: The attribute that carries the route's metadata (as protobuf text, not a Struct).
ROUTE_METADATA_ATTRIBUTE = "xds.route_metadata"

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class RouteFacts:
    """What the first message of a stream says about its route, as plain values (read-only).

    ``attributes``: the ``request_attributes`` Envoy evaluated, by name (strings, floats,
    booleans; a CEL value of another type arrives as its printed text). ``metadata``: dynamic
    metadata forwarded by ``metadata_options.forwarding_namespaces``, by namespace.
    ``headers``: the request headers (empty unless the message is ``request_headers``)."""

    attributes: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def route_metadata(self) -> Mapping[str, Any] | None:
        """The route's ``filter_metadata`` by namespace, from the ``xds.route_metadata``
        attribute; empty if Envoy did not send it, None if it could not be read."""
        text = self.attributes.get(ROUTE_METADATA_ATTRIBUTE)
        if not isinstance(text, str) or not text.strip():
            return {}
        return parse_route_metadata(text)


def _struct_values(struct: struct_pb2.Struct) -> dict[str, Any]:
    values: dict[str, Any] = json_format.MessageToDict(struct)
    return values


def route_facts(request: pb.ProcessingRequest) -> RouteFacts:
    """The route facts of a stream's first message (the one that carries the attributes)."""
    attributes = request.attributes.get(ATTRIBUTES_KEY) if request.attributes else None
    metadata = {namespace: _struct_values(values)
                for namespace, values in request.metadata_context.filter_metadata.items()}
    headers = (header_map(request.request_headers.headers)
               if request.WhichOneof("request") == "request_headers" else {})
    return RouteFacts(_struct_values(attributes) if attributes is not None else {}, metadata,
                      headers)


def _top_level_fields(text: str) -> Iterator[tuple[str, str]]:
    """``(name, "{...}")`` for each top-level message field of protobuf text: braces are
    balanced outside quoted strings (which may hold braces and escaped quotes)."""
    index, size = 0, len(text)
    while index < size:
        while index < size and text[index].isspace():
            index += 1
        match = _FIELD_NAME.match(text, index)
        if match is None:
            if index < size:
                raise ValueError(f"unexpected {text[index]!r} at {index}")
            return
        index = match.end()
        while index < size and text[index] in " \t\n:":
            index += 1
        if index >= size or text[index] != "{":
            raise ValueError(f"expected '{{' after {match[0]}")
        start, depth, quote = index, 0, ""
        while index < size:
            char = text[index]
            if quote:
                if char == "\\":
                    index += 1
                elif char == quote:
                    quote = ""
            elif char in "\"'":
                quote = char
            elif char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    index += 1
                    break
            index += 1
        if depth:
            raise ValueError("unbalanced braces")
        yield match[0], text[start:index]


@functools.lru_cache(maxsize=256)
def _parse_route_metadata(text: str) -> Mapping[str, Any] | None:
    metadata = base_pb2.Metadata()
    try:
        text_format.Parse(text, metadata)
    except text_format.ParseError:
        # typed_filter_metadata holds Any messages of types we do not know (text format
        # expands them); route selection reads only filter_metadata, so drop the rest.
        try:
            untyped = " ".join(f"{name} {block}" for name, block in _top_level_fields(text)
                               if name == "filter_metadata")
            metadata = base_pb2.Metadata()
            text_format.Parse(untyped, metadata)
        except (ValueError, text_format.ParseError):
            return None
    return {namespace: _struct_values(values)
            for namespace, values in metadata.filter_metadata.items()}


def parse_route_metadata(text: str) -> Mapping[str, Any] | None:
    """The ``filter_metadata`` of a ``config.core.v3.Metadata`` that Envoy printed as protobuf
    text (how ext_proc sends the ``xds.route_metadata`` attribute, ext_proc.md section 6), by
    namespace; None if the text cannot be read. Cached: a route's metadata text repeats on
    every request of the route."""
    return _parse_route_metadata(text)
