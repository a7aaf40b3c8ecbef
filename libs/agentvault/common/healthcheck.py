"""`python -m agentvault.common.healthcheck HOST:PORT`: a grpc.health.v1 probe for container healthchecks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Calls Health/Check once on `target`; returns (serving, one-line description)."""
    label = f"{target} service={service or '<server>'}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return False, f"{label}: {name}: {detail}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{label}: {status}"


def _positive(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentvault.common.healthcheck",
        description="Exit 0 if the gRPC server reports SERVING (grpc.health.v1 Check), else 1.",
    )
    parser.add_argument("target", help="HOST:PORT of the gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=_positive, default=3.0, help="deadline in seconds (default: 3)")
    args = parser.parse_args(argv)
    serving, line = check(args.target, args.service, args.timeout)
    print(line, file=sys.stdout if serving else sys.stderr, flush=True)
    return EXIT_SERVING if serving else EXIT_UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
