"""The grpc.reflection.v1 descriptor the runtime derives from v1alpha (diffmesh/runtime/reflection.py)
is gRPC's own v1 protocol: compared with upstream's grpc/reflection/v1/reflection.proto (shipped
in the npm package @grpc/reflection), compiled here with protoc."""
from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

from diffmesh.runtime import reflection
from tests import tools


def _shape(file: descriptor_pb2.FileDescriptorProto) -> dict:
    """What the wire and generated code depend on: messages, fields, oneofs, the service."""
    def field(f: descriptor_pb2.FieldDescriptorProto) -> tuple:
        return (f.name, f.number, f.label, f.type, f.type_name,
                f.oneof_index if f.HasField("oneof_index") else None, f.json_name)
    return {
        "package": file.package, "name": file.name, "syntax": file.syntax,
        "go_package": file.options.go_package, "java_package": file.options.java_package,
        "messages": {m.name: ([field(f) for f in m.field], [o.name for o in m.oneof_decl], len(m.nested_type),
                              len(m.enum_type)) for m in file.message_type},
        "enums": [e.name for e in file.enum_type],
        "services": {s.name: [(m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                              for m in s.method] for s in file.service},
    }


def _upstream_v1(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    root = tools.reflection_v1_proto_root()
    out = tmp_path / "v1.binpb"
    assert protoc.main(["protoc", f"-I{root}", f"--descriptor_set_out={out}",
                        "grpc/reflection/v1/reflection.proto"]) == 0
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return file


def test_derived_v1_descriptor_matches_upstream(tmp_path):
    ours = descriptor_pb2.FileDescriptorProto()
    reflection.v1_file_descriptor().CopyToProto(ours)
    # json_name: protoc fills it in a descriptor set; the pool leaves it implicit (same default).
    upstream = _upstream_v1(tmp_path)
    for message in upstream.message_type:
        for f in message.field:
            f.ClearField("json_name")
    assert _shape(ours) == _shape(upstream)
    assert ours.package == "grpc.reflection.v1" and reflection.V1_SERVICE_NAME == "grpc.reflection.v1.ServerReflection"
