"""``extproc.envoy``: the ext_proc message builders and header reader, and the mode overrides
against the ``allowed_override_modes`` allow-list in ``envoy/envoy.yaml``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from extproc import envoy
from extproc._pb.envoy.config.core.v3 import base_pb2
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.envoy import (
    MODE_BUFFER_REQUEST,
    MODE_BUFFER_RESPONSE,
    MODE_FULL_DUPLEX_RESPONSE,
    MODE_SKIP_RESPONSE,
    ProcessingMode,
    ProcessingRequest,
    ProcessingResponse,
    continue_request_body,
    continue_trailers,
    header_map,
    headers_response,
    immediate_response,
    streamed_response_body,
)
from extproc.settings.values import StreamSettings

ENVOY_YAML = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"

OVERRIDES = {
    "MODE_SKIP_RESPONSE": MODE_SKIP_RESPONSE,
    "MODE_BUFFER_REQUEST": MODE_BUFFER_REQUEST,
    "MODE_BUFFER_RESPONSE": MODE_BUFFER_RESPONSE,
    "MODE_FULL_DUPLEX_RESPONSE": MODE_FULL_DUPLEX_RESPONSE,
}


def set_fields(message: Any) -> dict[str, Any]:
    return {field.name: value for field, value in message.ListFields()}


def roundtrip(response: ProcessingResponse) -> ProcessingResponse:
    copy = ProcessingResponse()
    copy.ParseFromString(response.SerializeToString())
    assert copy == response
    return copy


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# --------------------------------------------------------------------------- header_map


def _hv(key: str, value: str = "", raw: bytes = b"") -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, value=value, raw_value=raw)


def test_header_map_prefers_raw_value() -> None:
    headers = base_pb2.HeaderMap(headers=[
        _hv(":path", raw=b"/v1/chat/completions"),
        _hv("content-type", value="text/plain", raw=b"application/json"),
    ])
    assert header_map(headers) == {
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
    }


def test_header_map_falls_back_to_value() -> None:
    headers = base_pb2.HeaderMap(headers=[
        _hv(":method", value="POST"),
        _hv("x-empty"),
    ])
    assert header_map(headers) == {":method": "POST", "x-empty": ""}


def test_header_map_lowercases_names_and_later_duplicates_win() -> None:
    headers = base_pb2.HeaderMap(headers=[
        _hv("Content-Type", raw=b"text/html"),
        _hv("X-Trace", raw=b"1"),
        _hv("content-type", raw=b"text/event-stream; charset=utf-8"),
        _hv("x-trace", value="2"),
    ])
    assert header_map(headers) == {
        "content-type": "text/event-stream; charset=utf-8",
        "x-trace": "2",
    }


def test_header_map_decodes_utf8_and_replaces_invalid_bytes() -> None:
    headers = base_pb2.HeaderMap(headers=[
        _hv("x-city", raw="Zürich".encode()),
        _hv("x-bad", raw=b"a\xffb"),
    ])
    assert header_map(headers) == {"x-city": "Zürich", "x-bad": "a\ufffdb"}


def test_header_map_empty() -> None:
    assert header_map(base_pb2.HeaderMap()) == {}


def test_header_map_reads_a_processing_request() -> None:
    request = ProcessingRequest()
    request.request_headers.headers.headers.add(key=":method", raw_value=b"POST")
    request.request_headers.headers.headers.add(key=":path", value="/v1/chat/completions")
    assert header_map(request.request_headers.headers) == {
        ":method": "POST", ":path": "/v1/chat/completions"}


# --------------------------------------------------------------------------- mode constants


def test_mode_constants_have_exactly_their_fields() -> None:
    assert set_fields(MODE_SKIP_RESPONSE) == {"response_header_mode": ProcessingMode.SKIP}
    assert set_fields(MODE_BUFFER_REQUEST) == {"request_body_mode": ProcessingMode.BUFFERED}
    assert set_fields(MODE_BUFFER_RESPONSE) == {
        "response_body_mode": ProcessingMode.BUFFERED_PARTIAL}
    assert set_fields(MODE_FULL_DUPLEX_RESPONSE) == {
        "response_body_mode": ProcessingMode.FULL_DUPLEX_STREAMED,
        "response_trailer_mode": ProcessingMode.SEND,
    }


@pytest.mark.parametrize("name", ["MODE_BUFFER_REQUEST", "MODE_FULL_DUPLEX_RESPONSE"])
def test_header_modes_left_default(name: str) -> None:
    mode = OVERRIDES[name]
    assert mode.request_header_mode == ProcessingMode.DEFAULT
    assert mode.response_header_mode == ProcessingMode.DEFAULT


def test_skip_response_touches_nothing_else() -> None:
    mode = MODE_SKIP_RESPONSE
    assert mode.request_header_mode == ProcessingMode.DEFAULT
    assert mode.request_body_mode == ProcessingMode.NONE
    assert mode.response_body_mode == ProcessingMode.NONE
    assert mode.request_trailer_mode == ProcessingMode.DEFAULT
    assert mode.response_trailer_mode == ProcessingMode.DEFAULT


def test_full_duplex_sets_trailers_send_only_in_its_direction() -> None:
    mode = MODE_FULL_DUPLEX_RESPONSE
    assert mode.response_body_mode == ProcessingMode.FULL_DUPLEX_STREAMED
    assert mode.response_trailer_mode == ProcessingMode.SEND
    assert mode.request_body_mode == ProcessingMode.NONE
    assert mode.request_trailer_mode == ProcessingMode.DEFAULT


def test_buffer_request_leaves_response_modes_alone() -> None:
    mode = MODE_BUFFER_REQUEST
    assert mode.request_body_mode == ProcessingMode.BUFFERED
    assert mode.response_body_mode == ProcessingMode.NONE
    assert mode.request_trailer_mode == ProcessingMode.DEFAULT
    assert mode.response_trailer_mode == ProcessingMode.DEFAULT


def test_module_exports_exactly_these_mode_constants() -> None:
    exported = {name for name in vars(envoy) if name.startswith("MODE_")}
    assert exported == set(OVERRIDES)


# --------------------------------------------------------------------------- envoy.yaml drift


def _ext_proc_config() -> dict[str, Any]:
    config = yaml.safe_load(ENVOY_YAML.read_text())
    found = []
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter.get("typed_config", {})
                for http_filter in hcm.get("http_filters", []):
                    if http_filter["name"] == EXT_PROC_FILTER:
                        found.append(http_filter["typed_config"])
    assert len(found) == 1, "expected exactly one ext_proc filter in envoy.yaml"
    return found[0]


def _key(mode: ProcessingMode) -> bytes:
    return mode.SerializeToString(deterministic=True)


def test_allowed_override_modes_match_the_code_exactly() -> None:
    config = _ext_proc_config()
    assert config["allow_mode_override"] is True
    entries = config["allowed_override_modes"]
    parsed = [json_format.ParseDict(entry, ProcessingMode()) for entry in entries]
    assert len({_key(m) for m in parsed}) == len(parsed), "duplicate allow-list entries"
    assert {_key(m) for m in parsed} == {_key(m) for m in OVERRIDES.values()}
    # Same comparison, readable on failure.
    assert sorted(json.dumps(as_dict(m), sort_keys=True) for m in parsed) == sorted(
        json.dumps(as_dict(m), sort_keys=True) for m in OVERRIDES.values())


def test_base_processing_mode_buffers_prompts_and_nothing_else() -> None:
    # The request body is BUFFERED from the start: switched on only by the headers answer, a
    # large chunked body stalled Envoy (test_bug_chunked_prompt_over_envoys_buffer_limit_...).
    base = json_format.ParseDict(_ext_proc_config()["processing_mode"], ProcessingMode())
    assert base.request_header_mode == ProcessingMode.DEFAULT
    assert base.response_header_mode == ProcessingMode.DEFAULT
    assert base.request_body_mode == ProcessingMode.BUFFERED
    assert base.response_body_mode == ProcessingMode.NONE


def test_metadata_namespace_default_is_the_one_envoy_receives() -> None:
    config = _ext_proc_config()
    namespaces = config["metadata_options"]["receiving_namespaces"]["untyped"]
    default = StreamSettings.__dataclass_fields__["metadata_namespace"].default
    assert default in namespaces


# --------------------------------------------------------------------------- headers_response


@pytest.mark.parametrize(("phase", "field"), [(True, "response_headers"),
                                              (False, "request_headers")])
def test_headers_response_plain_continue(phase: bool, field: str) -> None:
    response = roundtrip(headers_response(response_phase=phase))
    assert response.WhichOneof("response") == field
    answer = getattr(response, field)
    assert answer.HasField("response")
    common = answer.response
    assert common.status == 0  # CONTINUE
    assert not common.HasField("header_mutation")
    assert not common.HasField("body_mutation")
    assert not response.HasField("mode_override")
    assert not response.HasField("dynamic_metadata")


def test_headers_response_removes_headers() -> None:
    response = roundtrip(headers_response(
        response_phase=False, remove_headers=("accept-encoding", "content-length")))
    mutation = response.request_headers.response.header_mutation
    assert list(mutation.remove_headers) == ["accept-encoding", "content-length"]
    assert len(mutation.set_headers) == 0


def test_headers_response_remove_headers_from_a_generator() -> None:
    response = headers_response(response_phase=True,
                                remove_headers=(h for h in ["content-length"]))
    assert list(response.response_headers.response.header_mutation.remove_headers) == [
        "content-length"]


def test_headers_response_empty_remove_list_sets_no_mutation() -> None:
    response = headers_response(response_phase=True, remove_headers=[])
    assert not response.response_headers.response.HasField("header_mutation")


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_headers_response_mode_override(name: str) -> None:
    mode = OVERRIDES[name]
    before = _key(mode)
    response = roundtrip(headers_response(response_phase=True, mode=mode))
    assert response.HasField("mode_override")
    assert response.mode_override == mode
    assert set_fields(response.mode_override) == set_fields(mode)
    # The module constant is copied, never shared or changed.
    response.mode_override.request_body_mode = ProcessingMode.STREAMED
    assert _key(mode) == before


def test_headers_response_everything_together() -> None:
    response = roundtrip(headers_response(
        response_phase=False,
        remove_headers=["accept-encoding"],
        mode=MODE_BUFFER_REQUEST,
        metadata_namespace="guardrail",
        metadata={"format": "openai.chat_completions", "input_check": "parallel"},
    ))
    assert response.WhichOneof("response") == "request_headers"
    assert list(response.request_headers.response.header_mutation.remove_headers) == [
        "accept-encoding"]
    assert response.mode_override == MODE_BUFFER_REQUEST
    assert as_dict(response.dynamic_metadata) == {
        "guardrail": {"format": "openai.chat_completions", "input_check": "parallel"}}


def test_headers_response_empty_metadata_sets_nothing() -> None:
    response = headers_response(response_phase=True, metadata_namespace="guardrail",
                                metadata={})
    assert not response.HasField("dynamic_metadata")


# --------------------------------------------------------------------------- streamed body


@pytest.mark.parametrize(
    ("body", "end"),
    [
        (b'data: {"choices":[]}\n\n', False),
        (b"data: [DONE]\n\n", True),
        (b"", True),
        (b"", False),
        ("ü 日本 🙂".encode(), False),
    ],
    ids=["chunk", "last", "empty-end", "empty-hold", "utf8"],
)
def test_streamed_response_body(body: bytes, end: bool) -> None:
    response = roundtrip(streamed_response_body(body, end))
    assert response.WhichOneof("response") == "response_body"
    common = response.response_body.response
    assert common.status == 0
    assert not common.HasField("header_mutation")
    assert common.HasField("body_mutation")
    mutation = common.body_mutation
    assert mutation.WhichOneof("mutation") == "streamed_response"
    assert mutation.body == b""
    assert mutation.clear_body is False
    streamed = mutation.streamed_response
    assert streamed.body == body
    assert streamed.end_of_stream is end
    assert streamed.end_of_stream_without_message is False
    assert not response.HasField("dynamic_metadata")
    assert not response.HasField("mode_override")


@pytest.mark.parametrize("end", [False, True])
@pytest.mark.parametrize("body", [b"", b"x", b"data: [DONE]\n\n", bytes(range(256)) * 70],
                         ids=["empty", "one", "done", "16k"])
def test_streamed_response_body_bytes_equal_the_nested_constructors(body: bytes,
                                                                   end: bool) -> None:
    # The builder sets the leaf in place (cheaper); the wire bytes must be those of the plain
    # nested-constructor form, including the empty body's present-but-empty sub-messages.
    nested = ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
            body=body, end_of_stream=end)))))
    built = streamed_response_body(body, end)
    assert built.SerializeToString() == nested.SerializeToString()
    assert built.SerializeToString(deterministic=True) == nested.SerializeToString(
        deterministic=True)
    assert built.response_body.response.body_mutation.HasField("streamed_response")


def test_streamed_response_body_with_metadata() -> None:
    metadata = {"outcome": "block", "checks": 3, "text_units": 7, "released_chars": 120,
                "guardrail_id": "gr0abc123xyz", "guardrail_version": "DRAFT"}
    response = roundtrip(streamed_response_body(
        b"data: [DONE]\n\n", True, metadata_namespace="guardrail", metadata=metadata))
    assert set(response.dynamic_metadata.fields) == {"guardrail"}
    assert as_dict(response.dynamic_metadata) == {"guardrail": metadata}
    assert response.response_body.response.body_mutation.WhichOneof(
        "mutation") == "streamed_response"


def test_streamed_response_body_custom_namespace() -> None:
    response = streamed_response_body(b"x", False, metadata_namespace="my.ns",
                                      metadata={"outcome": "pass"})
    assert as_dict(response.dynamic_metadata) == {"my.ns": {"outcome": "pass"}}


def test_streamed_response_body_does_not_keep_the_callers_metadata() -> None:
    metadata: dict[str, Any] = {"outcome": "pass"}
    response = streamed_response_body(b"", True, metadata_namespace="guardrail",
                                      metadata=metadata)
    metadata["outcome"] = "block"
    assert as_dict(response.dynamic_metadata) == {"guardrail": {"outcome": "pass"}}


# --------------------------------------------------------------------------- immediate response


def test_immediate_response() -> None:
    body = b'{"error": {"message": "Violated guardrail policy", "code": 400}}'
    response = roundtrip(immediate_response(400, body, details="guardrail_violation"))
    assert response.WhichOneof("response") == "immediate_response"
    reply = response.immediate_response
    assert reply.status.code == 400
    assert reply.body == body
    assert reply.details == "guardrail_violation"
    assert not reply.HasField("grpc_status")
    assert list(reply.headers.remove_headers) == []
    assert len(reply.headers.set_headers) == 1
    option = reply.headers.set_headers[0]
    assert option.header.key == "content-type"
    assert option.header.raw_value == b"application/json"
    assert option.header.value == ""
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert not response.HasField("dynamic_metadata")


@pytest.mark.parametrize("status", [400, 403, 429, 500, 503])
def test_immediate_response_status(status: int) -> None:
    response = immediate_response(status, b"{}", details="x")
    assert response.immediate_response.status.code == status


def test_immediate_response_content_type_and_metadata() -> None:
    response = roundtrip(immediate_response(
        503, b"data: x\n\n", details="guardrail_unavailable", content_type="text/event-stream",
        metadata_namespace="guardrail", metadata={"outcome": "unavailable"}))
    option = response.immediate_response.headers.set_headers[0]
    assert option.header.raw_value == b"text/event-stream"
    assert option.header.value == ""
    assert as_dict(response.dynamic_metadata) == {"guardrail": {"outcome": "unavailable"}}


def test_immediate_response_non_ascii_content_type_is_utf8() -> None:
    response = immediate_response(400, b"", details="d", content_type="text/plain; x=ü")
    assert response.immediate_response.headers.set_headers[0].header.raw_value == (
        "text/plain; x=ü".encode())


def test_no_builder_writes_header_value_field() -> None:
    """Setting both ``value`` and ``raw_value`` makes Envoy fail the request."""
    responses = [
        immediate_response(400, b"{}", details="d"),
        headers_response(response_phase=True, remove_headers=["a"]),
    ]
    seen = 0
    for response in responses:
        for descriptor, message in _walk(response):
            if descriptor.full_name == "envoy.config.core.v3.HeaderValue":
                assert message.value == ""
                assert message.raw_value != b""
                seen += 1
    assert seen == 1  # the content-type of the immediate response


def _walk(message: Any) -> list[tuple[Any, Any]]:
    out = [(message.DESCRIPTOR, message)]
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        if field.message_type.GetOptions().map_entry:
            continue
        for item in items:
            out += _walk(item)
    return out


# --------------------------------------------------------------------------- trailers, request body


@pytest.mark.parametrize(("phase", "field"), [(True, "response_trailers"),
                                              (False, "request_trailers")])
def test_continue_trailers(phase: bool, field: str) -> None:
    response = roundtrip(continue_trailers(response_phase=phase))
    assert response.WhichOneof("response") == field
    trailers = getattr(response, field)
    assert not trailers.HasField("header_mutation")
    assert trailers.ByteSize() == 0
    assert not response.HasField("mode_override")
    assert not response.HasField("dynamic_metadata")


def test_continue_request_body() -> None:
    response = roundtrip(continue_request_body())
    assert response.WhichOneof("response") == "request_body"
    assert response.request_body.HasField("response")
    common = response.request_body.response
    assert common.status == 0
    assert not common.HasField("body_mutation")
    assert not common.HasField("header_mutation")
