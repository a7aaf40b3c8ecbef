"""`agentvault`: the command-line tool for a mesh, printing JSON the way the REST API does, or tables.

Exit codes: 0 success, 1 the call failed (server error, unreachable, not found, denied), 2 bad usage or input,
including a request the server rejected as INVALID_ARGUMENT. Errors are one line on stderr (then one line per
invalid field), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from agentvault.client.base import DEFAULT_TIMEOUT, TOKEN_ENV, GrpcClient
from agentvault.client.convert import enum_number, enum_words, from_dict, parse_capability, parse_endpoint, to_dict
from agentvault.client.discovery import DiscoveryClient, DiscoveryFilters
from agentvault.client.errors import ClientError
from agentvault.client.federation import FederationClient
from agentvault.client.identity import IdentityClient
from agentvault.client.registry import AgentFilters, RegistryClient
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.registry.v1 import registry_service_pb2 as pb

PROG = "agentvault"
DISTRIBUTION = "agentvault-mesh"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

SHARING_WORDS = enum_words(pb.Sharing.DESCRIPTOR)
KIND_WORDS = enum_words(pb.CapabilityKind.DESCRIPTOR)
ROLE_WORDS = enum_words(pb.Role.DESCRIPTOR)
# "auto" is the unspecified protocol: learned from the peer's discovery document.
PROTOCOL_WORDS = ["auto", *enum_words(fpb.PeerProtocol.DESCRIPTOR)]
# Columns of `-o table`, by the list a reply carries; a command may override them (discover's agents).
LIST_COLUMNS: dict[str, tuple[str, ...]] = {
    "agents": ("id", "did", "name", "version", "agent_type", "sharing", "owner", "health_status"),
    "api_keys": ("id", "name", "role", "principal_id", "create_time", "revoke_time"),
    "peers": ("id", "name", "registry_url", "protocol", "is_active", "health_status", "agent_count", "is_down"),
    "credentials": ("id", "name", "create_time", "revoke_time", "last_used_time"),
    "clients": ("client_id", "name", "scopes", "grant_types", "agent_id", "disabled", "create_time"),
}
DISCOVERED_COLUMNS = ("did", "name", "version", "agent_type", "health_status", "registry_name", "is_federated", "score")
PEER_STAT_COLUMNS = ("name", "status", "from_cache", "result_count", "latency_ms", "error")
# The option naming each service's address, by the variable it defaults to.
ADDRESS_FLAGS = {RegistryClient.ADDRESS_ENV: "registry", DiscoveryClient.ADDRESS_ENV: "discovery"}
# Scalar agent fields settable from a flag of the same name (with - for _).
SCALAR_FIELDS = ("did", "name", "version", "description", "agent_type", "sharing", "health_check_url")
LIST_FIELDS = {"tags": "tag", "capabilities": "capability", "endpoints": "endpoint"}
WRITABLE_FIELDS = (*SCALAR_FIELDS, *LIST_FIELDS)


class UsageError(Exception):
    """Bad command-line input, found after argparse accepted the syntax."""


# Each command's handler takes the client its command names (RegistryClient unless told otherwise).
Handler = Callable[[Any, argparse.Namespace], Awaitable[dict[str, Any]]]


# --------------------------------------------------------------------------------------------- input


def _read_json(path: str) -> Any:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{'stdin' if path == '-' else path}: invalid JSON: {exc}") from None


def _agent_from_args(args: argparse.Namespace) -> tuple[pb.Agent, list[str]]:
    """The agent described by --file and the field flags (flags win), and the fields they set, in order."""
    paths: list[str] = []
    agent = pb.Agent()
    if args.file is not None:
        data = _read_json(args.file)
        try:
            agent = from_dict(data, pb.Agent)
        except ValueError as exc:
            raise UsageError(f"{args.file}: {exc}") from None
        fields = pb.Agent.DESCRIPTOR.fields_by_name
        camel = pb.Agent.DESCRIPTOR.fields_by_camelcase_name
        paths += [fd.name for key in data if (fd := fields.get(key) or camel.get(key)) and fd.name in WRITABLE_FIELDS]
    try:
        for name in SCALAR_FIELDS:
            value = getattr(args, name)
            if value is not None:
                if name == "sharing":
                    value = enum_number(pb.Sharing.DESCRIPTOR, value, "--sharing")
                setattr(agent, name, value)
                paths.append(name)
        lists: dict[str, list[Any] | None] = {
            "tags": args.tag,
            "capabilities": [parse_capability(c) for c in args.capability] if args.capability else None,
            "endpoints": [parse_endpoint(e) for e in args.endpoint] if args.endpoint else None,
        }
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for name, items in lists.items():
        if items is not None:
            field = getattr(agent, name)
            del field[:]
            field.extend(items)
            paths.append(name)
    return agent, list(dict.fromkeys(paths))


AGENT_FILTERS = tuple(AgentFilters.__annotations__)
DISCOVERY_FILTERS = tuple(DiscoveryFilters.__annotations__)


def _filters(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: value for name in names if (value := getattr(args, name))}


# ------------------------------------------------------------------------------------------ commands


async def agents_create(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    agent, _ = _agent_from_args(args)
    return to_dict(await client.create_agent(agent))


async def agents_get(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.get_agent(args.id))


async def agents_list(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    search = getattr(args, "query", "")
    filters = _filters(args, AGENT_FILTERS)
    if args.all:
        agents = [a async for a in client.iter_agents(search=search, page_size=args.page_size, **filters)]
        return to_dict(pb.ListAgentsResponse(agents=agents))
    page = await client.list_agents(search=search, page_size=args.page_size, page_token=args.page_token, **filters)
    return to_dict(page)


async def agents_update(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    agent, paths = _agent_from_args(args)
    paths += [name for name in args.clear or () if name not in paths]
    if not paths:
        raise UsageError("nothing to update: give at least one field flag (e.g. --name), --clear FIELD or --file")
    agent.id = args.id
    return to_dict(await client.update_agent(agent, paths))


async def agents_delete(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    await client.delete_agent(args.id)
    return {}


async def keys_create(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.create_api_key(args.name, args.role, principal_id=args.principal_id))


async def keys_list(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    keys = [k async for k in client.iter_api_keys()]
    return to_dict(pb.ListApiKeysResponse(api_keys=keys))


async def keys_revoke(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.revoke_api_key(args.id))


async def whoami(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.caller())


async def health(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.health())


def _peer_from_args(args: argparse.Namespace) -> tuple[fpb.Peer, list[str]]:
    """The peer the flags describe, and the fields they set."""
    peer = fpb.Peer()
    paths: list[str] = []
    for name in ("name", "registry_url", "api_key", "grpc_endpoint", "require_mtls", "is_active"):
        value = getattr(args, name)
        if name == "api_key" and value == "-":  # kept out of the process list and shell history
            value = sys.stdin.readline().strip()
        if value is not None:
            setattr(peer, name, value)
            paths.append(name)
    if args.protocol is not None:
        protocol = "" if args.protocol == "auto" else args.protocol
        peer.protocol = enum_number(fpb.PeerProtocol.DESCRIPTOR, protocol, "--protocol")  # type: ignore[assignment]
        paths.append("protocol")
    if args.metadata is not None:
        for item in args.metadata:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--metadata: expected KEY=VALUE, got {item!r}")
            peer.metadata[key] = value
        paths.append("metadata")
    return peer, paths


async def peers_create(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    peer, _ = _peer_from_args(args)
    return to_dict(await client.create_peer(peer))


async def peers_list(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(fpb.ListPeersResponse(peers=[p async for p in client.iter_peers()]))


async def peers_get(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.get_peer(args.id))


async def peers_update(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    peer, paths = _peer_from_args(args)
    if not paths:
        raise UsageError("nothing to update: give at least one field flag (e.g. --name, --inactive)")
    peer.id = args.id
    return to_dict(await client.update_peer(peer, paths))


async def peers_delete(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    await client.delete_peer(args.id)
    return {}


async def peers_clear_cache(client: DiscoveryClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.clear_peer_cache(args.id))


async def credentials_create(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.create_credential(args.name))


async def credentials_list(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    credentials = [c async for c in client.iter_credentials()]
    return to_dict(fpb.ListFederationCredentialsResponse(credentials=credentials))


async def credentials_revoke(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.revoke_credential(args.id))


async def oauth_clients_create(client: IdentityClient, args: argparse.Namespace) -> dict[str, Any]:
    jwks = json.dumps(_read_json(args.jwks_file)) if args.jwks_file else ""
    return to_dict(
        await client.create_client(
            args.name,
            args.scope,
            grant_types=args.grant_type or (),
            agent_id=args.agent_id,
            jwks=jwks,
            token_endpoint_auth_method=args.auth_method,
        )
    )


async def oauth_clients_list(client: IdentityClient, args: argparse.Namespace) -> dict[str, Any]:
    clients = [c async for c in client.iter_clients()]
    return to_dict(ipb.ListOAuthClientsResponse(clients=clients))


async def oauth_clients_get(client: IdentityClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.get_client(args.client_id))


async def oauth_clients_rotate(client: IdentityClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.rotate_secret(args.client_id))


async def oauth_clients_disable(client: IdentityClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.disable_client(args.client_id))


async def oauth_clients_enable(client: IdentityClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.enable_client(args.client_id))


async def oauth_clients_delete(client: IdentityClient, args: argparse.Namespace) -> dict[str, Any]:
    await client.delete_client(args.client_id)
    return {}


async def discover(client: DiscoveryClient, args: argparse.Namespace) -> dict[str, Any]:
    reply = await client.search_agents(
        args.query,
        include_federated=args.include_federated,
        healthy_only=args.healthy_only,
        force_refresh=args.force_refresh,
        page_size=args.page_size,
        page_token=args.page_token,
        **_filters(args, DISCOVERY_FILTERS),
    )
    return to_dict(reply)


# -------------------------------------------------------------------------------------------- output


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        if "kind" in value and "name" in value:  # a capability, as typed on the command line
            return f"{value['kind']}:{value['name']}" + (f"@{value['version']}" if value.get("version") else "")
        if "protocol" in value and "url" in value:  # an endpoint
            return f"{value['protocol']}={value['url']}"
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[c.upper() for c in columns]] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _fields(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value and not {"kind", "protocol"} & value.keys():
            out += _fields(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", _cell(value)))
    return out


def _stats(stats: dict[str, Any]) -> str:
    counts = ", ".join(f"{k}={v}" for k, v in stats.items() if k != "peers")
    lines = [f"federation_stats: {counts}"]
    if stats.get("peers"):
        lines.append(_table(stats["peers"], PEER_STAT_COLUMNS))
    return "\n".join(lines)


def render(data: dict[str, Any], output: str, columns: Mapping[str, Sequence[str]] | None = None) -> str:
    """`data` as JSON, or as a table: a reply carrying a list prints it as rows, then federation_stats (discover)
    and, when there is a next page, a last line `next_page_token: TOKEN`; any other reply prints as fields."""
    if output == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    all_columns = {**LIST_COLUMNS, **(columns or {})}
    key = next((k for k in all_columns if isinstance(data.get(k), list)), None)
    if key is None:
        fields = _fields(data)
        width = max((len(k) for k, _ in fields), default=0)
        return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in fields)
    parts = [_table(data[key], all_columns[key])]
    if data.get("federation_stats"):
        parts.append(_stats(data["federation_stats"]))
    if data.get("next_page_token"):
        parts.append(f"next_page_token: {data['next_page_token']}")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- parsing


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The connection options; repeated on every command (without defaults) so they may follow it too."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--registry",
        metavar="HOST:PORT",
        default=default(None),
        help="registry address (default: $REGISTRY_ADDR, else 127.0.0.1:$REGISTRY_PORT)",
    )
    parser.add_argument(
        "--discovery",
        metavar="HOST:PORT",
        default=default(None),
        help="discovery service address, for discover and peers clear-cache (default: $DISCOVERY_ADDR, else "
        "127.0.0.1:$DISCOVERY_PORT)",
    )
    parser.add_argument("--token", default=default(None), help=f"bearer credential (default: ${TOKEN_ENV})")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call, retries included (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--output",
        "-o",
        choices=("json", "table"),
        default=default("json"),
        help="output format (default: json); a table of a page that has a next one ends with the line "
        "`next_page_token: TOKEN`",
    )
    parser.add_argument("--tls", action="store_true", default=default(False), help="use TLS with the system roots")
    parser.add_argument("--ca-file", metavar="PEM", default=default(None), help="use TLS with these root certificates")


def _agent_fields(parser: argparse.ArgumentParser, *, update: bool) -> None:
    parser.add_argument(
        "--file", "-f", metavar="PATH", help="agent JSON in the REST shape (enum words, snake_case); - for stdin"
    )
    parser.add_argument("--did", help="decentralized identifier, e.g. did:web:example.com:agents:nlp")
    parser.add_argument("--name", help="display name")
    parser.add_argument("--version", help="semantic version of the agent")
    parser.add_argument("--description")
    parser.add_argument("--agent-type", metavar="TYPE", help="type label, e.g. assistant")
    parser.add_argument("--sharing", choices=SHARING_WORDS)
    parser.add_argument("--health-check-url", metavar="URL")
    replace = " (replaces the agent's list)" if update else ""
    parser.add_argument("--tag", action="append", metavar="TAG", help=f"a tag; repeat for more{replace}")
    parser.add_argument(
        "--capability",
        action="append",
        metavar="KIND:NAME[@VERSION]",
        help=f"e.g. skill:summarize@1.2.0; kinds: {', '.join(KIND_WORDS)}; repeat for more{replace}",
    )
    parser.add_argument(
        "--endpoint", action="append", metavar="PROTOCOL=URL", help=f"e.g. http=https://agent.example/api{replace}"
    )


def _capability_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent-type", metavar="TYPE")
    parser.add_argument("--tag")
    parser.add_argument("--capability-kind", choices=KIND_WORDS)
    parser.add_argument("--capability-name", metavar="NAME")
    parser.add_argument("--capability-version", metavar="CONSTRAINT", help='e.g. ">=1.2,<2" or "^1.4"')


def _page_options(parser: argparse.ArgumentParser, max_size: int) -> None:
    parser.add_argument(
        "--page-size", type=int, default=0, help=f"results per page (server default 50, max {max_size})"
    )
    parser.add_argument("--page-token", default="", help="next_page_token of a previous page")


def _list_options(parser: argparse.ArgumentParser) -> None:
    _capability_filters(parser)
    parser.add_argument("--owner", metavar="PRINCIPAL_ID", help="only agents owned by this principal id")
    parser.add_argument("--sharing", choices=SHARING_WORDS)
    _page_options(parser, 500)
    parser.add_argument("--all", action="store_true", help="follow next_page_token to the last page")


def _peer_fields(parser: argparse.ArgumentParser, *, create: bool) -> None:
    parser.add_argument("--name", required=create, help="display name")
    parser.add_argument(
        "--registry-url", metavar="URL", required=create, help="the peer's public base URL (its edge), http(s)"
    )
    parser.add_argument(
        "--api-key",
        metavar="TOKEN",
        required=create,
        help="the federation token the peer issued to this mesh; - reads it from stdin",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOL_WORDS,
        help="grpc (a mesh of this project) or rest (GET /api/v1/agents); auto: learned from the peer's "
        "/.well-known/agentvault-federation (default)",
    )
    parser.add_argument("--grpc-endpoint", metavar="HOST:PORT", help="the peer's gRPC federation endpoint")
    parser.add_argument(
        "--require-mtls", action=argparse.BooleanOptionalAction, help="calls to the peer must use mutual TLS"
    )
    parser.add_argument(
        "--active",
        dest="is_active",
        action=argparse.BooleanOptionalAction,
        help="whether the peer is queried (default on create: active)",
    )
    parser.add_argument(
        "--metadata", action="append", metavar="KEY=VALUE", help="a label; repeat for more (replaces them all)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage agents, API keys and federation peers of an AgentVault mesh, and search it.",
        epilog="Exit codes: 0 ok, 1 the call failed, 2 bad usage or invalid input. With -o table, a page that has "
        "a next one ends with the line `next_page_token: TOKEN` (pass it to --page-token).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)

    def command(
        sub: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Handler,
        help: str,
        client: type[GrpcClient] = RegistryClient,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler, client=client, columns=None)
        return p

    agents = commands.add_parser("agents", help="register, find, change and remove agents")
    agent_cmds = agents.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _agent_fields(command(agent_cmds, "create", agents_create, "register an agent"), update=False)
    command(agent_cmds, "get", agents_get, "show one agent").add_argument("id")
    _list_options(command(agent_cmds, "list", agents_list, "list agents, newest first"))
    search = command(agent_cmds, "search", agents_list, "full-text search, best match first")
    search.add_argument("query")
    _list_options(search)
    update = command(agent_cmds, "update", agents_update, "change the fields given (and only those)")
    update.add_argument("id")
    _agent_fields(update, update=True)
    update.add_argument(
        "--clear", action="append", choices=WRITABLE_FIELDS, metavar="FIELD", help="reset a field to empty"
    )
    command(agent_cmds, "delete", agents_delete, "remove an agent").add_argument("id")

    keys = commands.add_parser("keys", help="issue, list and revoke API keys (admin only)")
    key_cmds = keys.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create_key = command(key_cmds, "create", keys_create, "issue a key; its token is printed this once")
    create_key.add_argument("name", help="display name of the key (names confer nothing; owners are principal ids)")
    create_key.add_argument(
        "--principal-id", default="", help="act as this existing principal (e.g. to rotate its key); default: a new one"
    )
    create_key.add_argument("--role", choices=ROLE_WORDS, default="member")
    command(key_cmds, "list", keys_list, "list every key, without secrets")
    command(key_cmds, "revoke", keys_revoke, "revoke a key at once").add_argument("id")

    federation = commands.add_parser("federation", help="peers of this mesh and credentials for others (admin only)")
    federation_cmds = federation.add_subparsers(dest="subgroup", required=True, metavar="COMMAND")
    peers = federation_cmds.add_parser("peers", help="the registries this mesh federates with")
    peer_cmds = peers.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fed = FederationClient
    _peer_fields(command(peer_cmds, "create", peers_create, "add a peer; its api_key is never shown again", fed),
                 create=True)  # fmt: skip
    command(peer_cmds, "list", peers_list, "list every peer, by name", fed)
    command(peer_cmds, "get", peers_get, "show one peer", fed).add_argument("id")
    update_peer = command(peer_cmds, "update", peers_update, "change the fields given (and only those)", fed)
    update_peer.add_argument("id")
    _peer_fields(update_peer, create=False)
    command(peer_cmds, "delete", peers_delete, "remove a peer and its cached agents", fed).add_argument("id")
    command(
        peer_cmds, "clear-cache", peers_clear_cache, "drop a peer's cached answers (discovery service)", DiscoveryClient
    ).add_argument("id")
    credentials = federation_cmds.add_parser("credentials", help="tokens other meshes present to this one")
    credential_cmds = credentials.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create_credential = command(
        credential_cmds, "create", credentials_create, "issue a token for a peer mesh; printed this once", fed
    )
    create_credential.add_argument("name", help="name of the peer mesh it is for")
    command(credential_cmds, "list", credentials_list, "list every credential, without tokens", fed)
    command(credential_cmds, "revoke", credentials_revoke, "revoke a credential at once", fed).add_argument("id")

    oauth = commands.add_parser("oauth", help="the OAuth 2.0 clients of this mesh's authorization server (admin only)")
    oauth_cmds = oauth.add_subparsers(dest="subgroup", required=True, metavar="COMMAND")
    clients = oauth_cmds.add_parser("clients", help="registered OAuth clients")
    client_cmds = clients.add_subparsers(dest="command", required=True, metavar="COMMAND")
    idc = IdentityClient
    create_client = command(
        client_cmds, "create", oauth_clients_create, "register a client; its secret is printed this once", idc
    )
    create_client.add_argument("name", help="display name, 1-128 characters")
    create_client.add_argument(
        "--scope", action="append", required=True, help="a scope it may be granted, e.g. agents:read; repeat for more"
    )
    create_client.add_argument(
        "--grant-type",
        action="append",
        help="client_credentials (default), refresh_token, urn:ietf:params:oauth:grant-type:token-exchange; repeat",
    )
    create_client.add_argument("--agent-id", default="", help="the agent the client speaks for")
    create_client.add_argument(
        "--auth-method",
        default="",
        choices=["", "client_secret_basic", "client_secret_post", "private_key_jwt"],
        help="how it authenticates at the token endpoint (default client_secret_basic)",
    )
    create_client.add_argument(
        "--jwks-file", default="", metavar="PATH", help="its public JWK Set (JSON) for private_key_jwt; - for stdin"
    )
    command(client_cmds, "list", oauth_clients_list, "list every client, without secrets", idc)
    command(client_cmds, "get", oauth_clients_get, "show one client", idc).add_argument("client_id")
    command(
        client_cmds, "rotate-secret", oauth_clients_rotate, "a new secret, printed this once; the old one stops", idc
    ).add_argument("client_id")
    command(
        client_cmds, "disable", oauth_clients_disable, "refuse its token requests, revoke the tokens it holds", idc
    ).add_argument("client_id")
    command(client_cmds, "enable", oauth_clients_enable, "accept its token requests again", idc).add_argument(
        "client_id"
    )
    command(client_cmds, "delete", oauth_clients_delete, "remove a client", idc).add_argument("client_id")

    find = command(
        commands,
        "discover",
        discover,
        "search this mesh and, with --include-federated, every peer at once (discovery service)",
        DiscoveryClient,
    )
    find.add_argument("query", nargs="?", default="", help="full-text query (default: everything)")
    find.add_argument("--include-federated", action="store_true", help="also ask the federation peers")
    find.add_argument("--healthy-only", action="store_true", help="only agents whose last health check passed")
    find.add_argument("--force-refresh", action="store_true", help="bypass the peers' cached answers")
    _capability_filters(find)
    _page_options(find, 200)
    find.set_defaults(columns={"agents": DISCOVERED_COLUMNS})

    command(commands, "health", health, "the registry's health and agent count")
    command(commands, "whoami", whoami, "the principal behind the credential: its id owns the agents it creates")
    return parser


# ------------------------------------------------------------------------------------------- running


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a bare checkout on PYTHONPATH, never installed
        return "unknown"


async def _run(args: argparse.Namespace, client: GrpcClient) -> dict[str, Any]:
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
        print(render(data, args.output, args.columns))
        if args.handler is health and data.get("status") not in ("healthy", "degraded"):
            return EXIT_FAILED
        sys.stdout.flush()
    except ClientError as exc:
        return _client_error(exc, client_class)
    except (UsageError, ValueError) as exc:  # ValueError: a bad setting or enum word found late
        return _fail(f"error: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; point stdout at /dev/null so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # the promise is one line, never a traceback
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
