"""Server reflection in both versions tools speak: grpc.reflection.v1 (grpcurl 1.9+, grpc-java,
Postman, current grpc-go) and grpc.reflection.v1alpha (older grpcurl, grpc_cli, the Python client).

grpcio-reflection ships only v1alpha (grpc/grpc#38576). v1 is the same protocol promoted: the
same messages with the same field names and numbers, in package grpc.reflection.v1. So the v1
descriptor is derived from v1alpha's (added to the default pool, so reflection can describe
itself under both names), and the library's servicer answers on both paths: the bytes on the
wire are identical.
"""
from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE_NAME = v1alpha.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, SERVICE_NAME)
_V1ALPHA_PREFIX = f".{reflection_pb2.DESCRIPTOR.package}."


def _retype(name: str) -> str:
    return f".{V1_PACKAGE}." + name[len(_V1ALPHA_PREFIX):] if name.startswith(_V1ALPHA_PREFIX) else name


def v1_file_descriptor() -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto in the default pool (added on first use)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    # The options upstream's v1 file carries (v1alpha's says deprecated: v1 is not).
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    for message in proto.message_type:  # v1alpha has no nested types
        for field in message.field:
            if field.HasField("type_name"):  # assigning "" would mark a scalar as typed
                field.type_name = _retype(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = _retype(method.input_type), _retype(method.output_type)
    return pool.AddSerializedFile(proto.SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server | grpc.Server) -> None:
    """Serves reflection v1 and v1alpha for service_names (both reflection services are added to
    the list). The servicer reads the default descriptor pool, where every generated module is."""
    v1_file_descriptor()
    names = list(dict.fromkeys([*service_names, *SERVICE_NAMES]))
    servicer = (v1alpha.aio.ReflectionServicer(names) if isinstance(server, grpc.aio.Server)
                else v1alpha.ReflectionServicer(names))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1_method}),))
