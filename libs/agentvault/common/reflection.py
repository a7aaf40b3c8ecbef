"""gRPC server reflection under both protocol versions: v1alpha (grpcio-reflection) and v1.

grpcio-reflection ships only v1alpha, while newer clients (`buf curl --reflect-protocol grpc-v1`, grpcurl) ask
for v1 first. The two protocols are the same messages under another package name, so the v1 service is the
v1alpha servicer registered under the v1 name, and its descriptor (the v1alpha file renamed) is added to the
default pool so that reflection can describe itself under either name.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_V1ALPHA_PREFIX = f".{reflection_pb2.DESCRIPTOR.package}."


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1_PACKAGE

    def renamed(type_name: str) -> str:
        return type_name.replace(_V1ALPHA_PREFIX, f".{V1_PACKAGE}.", 1)

    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    pool.Add(proto)


def enable(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serves reflection v1alpha and v1 for `service_names` (both reflection services are added to the list)."""
    _add_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer((*service_names, V1ALPHA_SERVICE, V1_SERVICE))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),)
    )
