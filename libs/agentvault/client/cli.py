"""`agentvault`: the command-line tool for a mesh, printing JSON the way the REST API does, or tables.

Exit codes: 0 success, 1 the call failed (server error, unreachable, not found, denied), 2 bad usage or input,
including a request the server rejected as INVALID_ARGUMENT. Errors are one line on stderr (then one line per
invalid field), never a traceback. A watch or stream (`approvals watch`, `messages watch`, `inbox stream`) prints
a line per event and exits 0 when the server ends it or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from agentvault.client.base import GrpcClient
from agentvault.client.cli_commands import STREAMS, Handler, UsageError, health
from agentvault.client.cli_output import render
from agentvault.client.cli_parser import PROG, build_parser
from agentvault.client.discovery import DiscoveryClient
from agentvault.client.errors import ClientError
from agentvault.client.messaging import MessagingClient
from agentvault.client.registry import RegistryClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# The option naming each service's address, by the variable it defaults to.
ADDRESS_FLAGS = {
    RegistryClient.ADDRESS_ENV: "registry",
    DiscoveryClient.ADDRESS_ENV: "discovery",
    MessagingClient.ADDRESS_ENV: "messaging",
}


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


async def _run(args: argparse.Namespace, client: GrpcClient) -> dict[str, Any] | None:
    async with client:
        handler: Handler = args.handler
        return await handler(client, args)


def _without_violations(message: str, violations: Sequence[Any]) -> str:
    """The status message minus the field violations it repeats (the server summarises the first few there),
    since they are printed one per line below it."""
    for v in violations:
        message = message.replace(f"{v.field}: {v.description}", "")
    return re.sub(r"(\s*;\s*)+", "; ", message).strip(" ;:,")


def _client_error(exc: ClientError, client: type[GrpcClient]) -> int:
    if exc.field_violations:
        count = len(exc.field_violations)
        exc.message = _without_violations(exc.message, exc.field_violations) or (
            f"{count} invalid field{'s' if count > 1 else ''}"
        )
    first = str(exc)
    if exc.unreachable:
        first += f"; set {client.ADDRESS_ENV} or --{ADDRESS_FLAGS[client.ADDRESS_ENV]}"
    lines = [f"{PROG}: {first}", *(f"  {v.field}: {v.description}" for v in exc.field_violations)]
    print("\n".join(lines), file=sys.stderr)
    return EXIT_USAGE if exc.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 with a usage line on bad syntax
    if args.timeout <= 0:
        return _fail("error: --timeout must be positive", EXIT_USAGE)
    client_class: type[GrpcClient] = args.client
    try:
        roots = None
        if args.ca_file:
            try:
                with open(args.ca_file, "rb") as f:
                    roots = f.read()
            except OSError as exc:
                raise UsageError(f"cannot read {args.ca_file}: {exc.strerror or exc}") from None
        address = getattr(args, ADDRESS_FLAGS[client_class.ADDRESS_ENV])  # None: the client reads the environment
        client = client_class(address, token=args.token, timeout=args.timeout, root_certificates=roots, tls=args.tls)
        data = asyncio.run(_run(args, client))
        if data is not None:  # None: a watch, which printed as it went
            print(render(data, args.output, args.columns))
        if args.handler is health and data is not None and data.get("status") not in ("healthy", "degraded"):
            return EXIT_FAILED
        sys.stdout.flush()
    except ClientError as exc:
        return _client_error(exc, client_class)
    except (UsageError, ValueError) as exc:  # ValueError: a bad setting or enum word found late
        return _fail(f"error: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch is meant to end; anything else was cut short.
        return EXIT_OK if args.handler in STREAMS else 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; point stdout at /dev/null so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # the promise is one line, never a traceback
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
