"""The argument parser of `agentvault`: its commands, their flags and help."""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Callable
from typing import Any

from agentvault.client.base import DEFAULT_TIMEOUT, TOKEN_ENV, GrpcClient
from agentvault.client.cli_commands import (
    WRITABLE_FIELDS,
    Handler,
    agents_card,
    agents_create,
    agents_delete,
    agents_get,
    agents_import_card,
    agents_list,
    agents_update,
    approvals_approve,
    approvals_deny,
    approvals_get,
    approvals_list,
    approvals_watch,
    capabilities_request,
    connections_changes,
    connections_get,
    connections_list,
    connections_set_trust,
    credentials_create,
    credentials_list,
    credentials_revoke,
    dead_letters_list,
    dead_letters_purge,
    dead_letters_replay,
    decisions_list,
    discover,
    grants_list,
    grants_revoke,
    health,
    inbox_ack,
    inbox_nack,
    inbox_receive,
    inbox_stream,
    invitations_create,
    invitations_delete,
    invitations_list,
    keys_create,
    keys_list,
    keys_revoke,
    messages_get,
    messages_list,
    messages_send,
    messages_watch,
    oauth_clients_create,
    oauth_clients_delete,
    oauth_clients_disable,
    oauth_clients_enable,
    oauth_clients_get,
    oauth_clients_list,
    oauth_clients_rotate,
    peers_clear_cache,
    peers_create,
    peers_delete,
    peers_get,
    peers_list,
    peers_update,
    policies_create,
    policies_delete,
    policies_explain,
    policies_get,
    policies_list,
    policies_update,
    whoami,
)
from agentvault.client.cli_output import DISCOVERED_COLUMNS
from agentvault.client.convert import enum_words
from agentvault.client.discovery import DiscoveryClient
from agentvault.client.federation import FederationClient
from agentvault.client.identity import IdentityClient
from agentvault.client.messaging import MAX_AWAIT_SECONDS, MAX_RECEIVE_WAIT_SECONDS, MessagingClient
from agentvault.client.policy import PolicyClient
from agentvault.client.registry import RegistryClient
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.registry.v1 import registry_service_pb2 as pb


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


PROG = "agentvault"
DISTRIBUTION = "agentvault-mesh"

SHARING_WORDS = enum_words(pb.Sharing.DESCRIPTOR)
KIND_WORDS = enum_words(pb.CapabilityKind.DESCRIPTOR)
ROLE_WORDS = enum_words(pb.Role.DESCRIPTOR)
# The policy control plane's words (strings in the API, checked here too for a clear usage error).
TRUST_LEVELS = ("blocked", "untrusted", "basic", "trusted")
CALLER_KINDS = ("person", "agent", "service", "peer", "client")
ACTIONS = ("agent.read", "message.send", "tool.list", "tool.invoke", "session.handoff", "capability.request")
OUTCOMES = ("allow", "deny", "ask")
APPROVAL_STATUSES = ("pending", "approved", "denied", "expired")
REQUEST_KINDS = ("tool", "skill", "model")
MESSAGE_STATUSES = ("held", "accepted", "delivered", "acknowledged", "failed", "dead_lettered", "expired", "refused")
# "auto" is the unspecified protocol: learned from the peer's discovery document.
PROTOCOL_WORDS = ["auto", *enum_words(fpb.PeerProtocol.DESCRIPTOR)]


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
    parser.add_argument(
        "--messaging",
        metavar="HOST:PORT",
        default=default(None),
        help="messaging service address, for messages, inbox and dead-letters (default: $MESSAGING_ADDR, else "
        "127.0.0.1:$MESSAGING_PORT)",
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
        "--registry-url",
        metavar="URL",
        help="the peer's public base URL (its edge), http(s)" + ("; not needed with --invitation" if create else ""),
    )
    parser.add_argument(
        "--api-key",
        metavar="TOKEN",
        help="the federation token the peer issued to this mesh; - reads it from stdin",
    )
    if create:
        parser.add_argument(
            "--invitation",
            metavar="CODE",
            help="instead of --api-key: an invitation code (avi_...) the peer issued; both directions' tokens are "
            "then agreed with the peer, none is copied; - reads it from stdin",
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


def _policy_fields(parser: argparse.ArgumentParser, *, create: bool) -> None:
    parser.add_argument("--name", required=create, help="unique name, 1-200 characters")
    parser.add_argument("--description", help="what it is for, at most 2000 characters")
    parser.add_argument("--text-file", metavar="PATH", help="file holding one Cedar policy; - for stdin")
    parser.add_argument("--text", help="one Cedar policy, inline (instead of --text-file)")
    state = parser.add_mutually_exclusive_group()
    on, off = ("--enabled", "--disabled") if create else ("--enable", "--disable")
    state.add_argument(
        on,
        dest="enabled",
        action="store_const",
        const=True,
        default=None,
        help="put it in force" + (" (default: disabled, kept but deciding nothing)" if create else ""),
    )
    state.add_argument(off, dest="enabled", action="store_const", const=False, help="keep it but decide nothing")


def _add_policy_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], command: Callable[..., argparse.ArgumentParser]
) -> None:
    """policies, approvals, grants, connections, decisions and capabilities: the registry's PolicyService."""
    pc = PolicyClient
    policies = commands.add_parser("policies", help="the mesh's Cedar policies (admin, or policies:admin)")
    policy_cmds = policies.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(policy_cmds, "list", policies_list, "list every policy, by name", pc)
    command(policy_cmds, "get", policies_get, "show one policy", pc).add_argument("id")
    _policy_fields(command(policy_cmds, "create", policies_create, "store a policy, checked against the schema", pc),
                   create=True)  # fmt: skip
    update = command(policy_cmds, "update", policies_update, "change the fields given (and only those)", pc)
    update.add_argument("id")
    _policy_fields(update, create=False)
    command(policy_cmds, "delete", policies_delete, "remove a policy", pc).add_argument("id")
    explain = command(
        policy_cmds,
        "explain",
        policies_explain,
        "what the enabled policies would decide, and why (nothing is done)",
        pc,
    )
    explain.add_argument("--caller-kind", choices=CALLER_KINDS, default="", help="who would act (default client)")
    explain.add_argument(
        "--caller-id", required=True, metavar="ID", help="a principal, agent, service, peer or client id"
    )
    explain.add_argument("--trust", choices=TRUST_LEVELS, default="", help="its connection's trust (default untrusted)")
    explain.add_argument("--scope", action="append", help="a scope its credential carries; repeat for more")
    explain.add_argument("--action", required=True, choices=ACTIONS)
    explain.add_argument("--agent-id", required=True, metavar="ID", help="the target agent (or the one offering it)")
    explain.add_argument("--name", default="", help="the tool's or capability's name")
    explain.add_argument("--version", default="", help="the tool's or capability's version")
    explain.add_argument(
        "--capability-kind", choices=REQUEST_KINDS, default="", help="a capability's kind (default skill)"
    )
    explain.add_argument(
        "--at", metavar="EPOCH", default="", help="decide at this time: epoch seconds or ISO 8601 (default now)"
    )
    explain.add_argument("--payload-size", type=int, default=0, metavar="BYTES", help="the request's size")  # fmt: skip

    approvals = commands.add_parser("approvals", help="requests the policies asked a person about")
    approval_cmds = approvals.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(approval_cmds, "list", approvals_list, "list the approvals you may see, newest first", pc).add_argument(
        "--status", choices=APPROVAL_STATUSES, default="", help="only this status"
    )
    command(approval_cmds, "get", approvals_get, "show one approval", pc).add_argument("id")
    approve = command(approval_cmds, "approve", approvals_approve, "answer yes: it becomes a grant", pc)
    approve.add_argument("id")
    approve.add_argument(
        "--duration", type=int, default=0, metavar="SECONDS", help="the grant's life (default: as asked)"
    )
    approve.add_argument("--uses", type=int, default=0, metavar="N", help="the grant's uses (default: as asked)")
    approve.add_argument("--note", default="", help="for the caller, at most 500 characters")
    deny = command(approval_cmds, "deny", approvals_deny, "answer no", pc)
    deny.add_argument("id")
    deny.add_argument("--note", default="", help="why, for the caller, at most 500 characters")
    command(
        approval_cmds, "watch", approvals_watch, "print each approval event as one JSON line until Ctrl-C", pc
    ).add_argument("--include-answered", action="store_true", help="also approvals answered or expired")

    grants = commands.add_parser("grants", help="permits for one caller, action and target, until they expire")
    grant_cmds = grants.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(grant_cmds, "list", grants_list, "list the grants in force you may see, newest first", pc).add_argument(
        "--all", action="store_true", help="also those expired, revoked or spent"
    )
    command(grant_cmds, "revoke", grants_revoke, "end a grant at once", pc).add_argument("id")

    connections = commands.add_parser("connections", help="callers this mesh and its agents have seen, and their trust")
    connection_cmds = connections.add_subparsers(dest="command", required=True, metavar="COMMAND")
    list_connections = command(connection_cmds, "list", connections_list, "list connections, latest contact first", pc)
    list_connections.add_argument("--trust-level", choices=TRUST_LEVELS, default="", help="only this trust level")
    list_connections.add_argument(
        "--agent-id", default="", metavar="ID", help="only those seen by this agent (- for the mesh itself)"
    )
    command(connection_cmds, "get", connections_get, "show one connection and its recent trust changes", pc
            ).add_argument("id")  # fmt: skip
    set_trust = command(connection_cmds, "set-trust", connections_set_trust, "set a connection's trust level", pc)
    set_trust.add_argument("id")
    set_trust.add_argument("--level", required=True, choices=TRUST_LEVELS)
    set_trust.add_argument("--reason", required=True, help="why, 1-500 characters; recorded with the change")
    command(connection_cmds, "changes", connections_changes, "list a connection's trust changes, newest first", pc
            ).add_argument("id")  # fmt: skip

    decisions = commands.add_parser("decisions", help="the decision log (admin, or policies:read)")
    decision_cmds = decisions.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listed = command(decision_cmds, "list", decisions_list, "list logged decisions, newest first", pc)
    listed.add_argument("--outcome", choices=OUTCOMES, default="", help="only this outcome")
    # The log holds every decision of its retention period: the newest few are what a terminal wants.
    listed.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most this many, newest first (100)"
    )

    capabilities = commands.add_parser("capabilities", help="ask for an agent's capability (a permission request)")
    capability_cmds = capabilities.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = command(
        capability_cmds, "request", capabilities_request, "ask; prints the decision: allow, deny or ask (exit 0)", pc
    )
    ask.add_argument("agent_id", help="the agent offering it (its UUID)")
    ask.add_argument("capability", help="the capability's name")
    ask.add_argument("--kind", choices=REQUEST_KINDS, default="", help="its kind (default: any kind with this name)")
    ask.add_argument("--version-constraint", default="", metavar="C", help='e.g. ">=1.2,<2" (default: any version)')
    ask.add_argument("--purpose", default="", help="why, shown to whoever approves; at most 2000 characters")
    ask.add_argument("--max-calls", type=int, default=0, metavar="N", help="the grant's most calls (default unlimited)")
    ask.add_argument("--duration", type=int, default=0, metavar="SECONDS", help="the grant's life (default 3600)")
    ask.add_argument(
        "--wait", type=int, default=0, metavar="SECONDS", help="when asked, wait this long for an answer (max 60)"
    )


def _add_messaging_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], command: Callable[..., argparse.ArgumentParser]
) -> None:
    """messages, inbox and dead-letters: the messaging service. The sender or receiver is the credential's
    principal (an agent's own OAuth token, or a person's API key)."""
    mc = MessagingClient
    messages = commands.add_parser("messages", help="send messages to agents, read and watch their status")
    message_cmds = messages.add_subparsers(dest="command", required=True, metavar="COMMAND")
    send = command(
        message_cmds, "send", messages_send, "send one message; prints it with its id and status (accepted, held)", mc
    )
    send.add_argument("--to", default="", metavar="AGENT_ID", help="the recipient: its UUID (or DID)")
    content = send.add_mutually_exclusive_group(required=True)
    content.add_argument("--text", help="the content: text")
    content.add_argument("--data", metavar="JSON", help="the content: any JSON value")
    content.add_argument("--file", metavar="PATH", help="the content: a file's bytes (- for stdin)")
    send.add_argument("--conversation", default="", metavar="ID", help="the conversation (default: a new one)")
    send.add_argument(
        "--reply-to", default="", metavar="ID", help="the message this answers (it goes to that message's sender)"
    )
    send.add_argument(
        "--key", default="", metavar="IDEMPOTENCY_KEY", help="sending again with the same key gives the same message"
    )
    send.add_argument("--header", action="append", metavar="NAME=VALUE", help="a header; repeat for more")
    send.add_argument(
        "--wait-reply",
        type=int,
        metavar="SECONDS",
        help=f"then wait this long (at most {MAX_AWAIT_SECONDS}) for the reply: printed as `reply` (null if none came)",
    )
    command(message_cmds, "get", messages_get, "show one message and its status", mc).add_argument("id")
    listed = command(message_cmds, "list", messages_list, "list the messages you sent or received, newest first", mc)
    listed.add_argument("--conversation", default="", metavar="ID", help="only this conversation")
    listed.add_argument("--correlation", default="", metavar="ID", help="only this correlation id")
    listed.add_argument("--agent", default="", metavar="AGENT_ID", help="only messages to or from this agent")
    listed.add_argument("--status", choices=MESSAGE_STATUSES, default="", help="only this status")
    listed.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most this many, newest first (100)"
    )
    watch = command(message_cmds, "watch", messages_watch, "print each status change as one JSON line until Ctrl-C", mc)
    which = watch.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", default="", help="one message (its current status first)")
    which.add_argument("--conversation", default="", metavar="ID", help="a conversation")
    which.add_argument("--agent", default="", metavar="AGENT_ID", help="an agent's traffic")

    inbox = commands.add_parser("inbox", help="read an inbox: yours, or an agent's you own (--agent)")
    inbox_cmds = inbox.add_subparsers(dest="command", required=True, metavar="COMMAND")
    receive = command(
        inbox_cmds, "receive", inbox_receive, "take messages; ack each (with its receipt) or it comes again", mc
    )
    receive.add_argument("--agent", default="", metavar="AGENT_ID", help="this agent's inbox (default: your own)")
    receive.add_argument("--max", type=int, default=0, metavar="N", help="at most this many, 1-100 (default 10)")
    receive.add_argument(
        "--wait",
        type=int,
        default=0,
        metavar="SECONDS",
        help=f"when the inbox is empty, wait up to this long (at most {MAX_RECEIVE_WAIT_SECONDS}) for a message",
    )
    receive.add_argument(
        "--visibility", type=int, default=0, metavar="SECONDS", help="how long each stays yours to ack (default 30)"
    )
    receive.add_argument("--ack", action="store_true", help="acknowledge each after printing it")
    ack = command(inbox_cmds, "ack", inbox_ack, "a received message was handled: it is not delivered again", mc)
    ack.add_argument("message_id")
    ack.add_argument("receipt", help="the delivery's receipt")
    nack = command(inbox_cmds, "nack", inbox_nack, "give a received message back (or dead-letter it)", mc)
    nack.add_argument("message_id")
    nack.add_argument("receipt", help="the delivery's receipt")
    nack.add_argument("--delay", type=int, default=0, metavar="SECONDS", help="deliver it again after this long")
    nack.add_argument("--reason", default="", help="why, at most 1024 characters (kept as its status reason)")
    nack.add_argument("--dead-letter", action="store_true", help="dead-letter it now instead")
    stream = command(
        inbox_cmds, "stream", inbox_stream, "print each message as one JSON line as it arrives, until Ctrl-C", mc
    )
    stream.add_argument("--agent", default="", metavar="AGENT_ID", help="this agent's inbox (default: your own)")
    stream.add_argument("--ack", action="store_true", help="acknowledge each after printing it")
    stream.add_argument(
        "--max-in-flight", type=int, default=0, metavar="N", help="at most this many unacknowledged (default 100)"
    )
    stream.add_argument(
        "--visibility", type=int, default=0, metavar="SECONDS", help="how long each stays yours to ack (default 30)"
    )

    dead = commands.add_parser("dead-letters", help="messages that could not be delivered (admin only)")
    dead_cmds = dead.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dead_list = command(dead_cmds, "list", dead_letters_list, "list dead letters with the reason, newest first", mc)
    dead_list.add_argument("--agent", default="", metavar="AGENT_ID", help="only those for this agent")
    dead_list.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most this many, newest first (100)"
    )
    command(dead_cmds, "replay", dead_letters_replay, "send a dead letter again, its attempts reset", mc
            ).add_argument("id")  # fmt: skip
    purge = command(dead_cmds, "purge", dead_letters_purge, "delete dead letters: all, an agent's, or older ones", mc)
    purge.add_argument("--agent", default="", metavar="AGENT_ID", help="only those for this agent")
    purge.add_argument("--before", metavar="RFC3339", help="only those dead-lettered before this time")
    purge.add_argument("--yes", action="store_true", help="yes, delete them (required)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage agents, API keys and federation peers of an AgentVault mesh, search it, and message its "
        "agents.",
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
        aliases: tuple[str, ...] = (),
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help, aliases=list(aliases))
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
    import_card = command(agent_cmds, "import-card", agents_import_card, "register an agent from its A2A agent card")
    import_card.add_argument(
        "url", nargs="?", help="where the card is (http(s); a bare origin reads /.well-known/agent-card.json)"
    )
    import_card.add_argument("--file", "-f", metavar="PATH", help="instead of a URL: the card JSON; - for stdin")
    import_card.add_argument("--did", default="", help="the agent's DID (default: did:web from the card)")
    import_card.add_argument("--sharing", choices=SHARING_WORDS, help="who may see it (default local)")
    command(agent_cmds, "card", agents_card, "show an agent as an A2A 1.0 agent card").add_argument("id")

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
    _peer_fields(command(peer_cmds, "create", peers_create, "add a peer; its api_key is never shown again", fed,
                         aliases=("add",)), create=True)  # fmt: skip
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
    invitations = federation_cmds.add_parser(
        "invitations", help="one-time codes another mesh redeems to peer with this one (no token is copied)"
    )
    invitation_cmds = invitations.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create_invitation = command(
        invitation_cmds, "create", invitations_create, "invite a peer mesh; the code is printed this once", fed
    )
    create_invitation.add_argument("name", help="name of the peer mesh it is for")
    create_invitation.add_argument(
        "--ttl", type=int, default=0, metavar="SECONDS", help="how long the code may be redeemed (default 3600)"
    )
    command(invitation_cmds, "list", invitations_list, "list invitations, without their codes", fed)
    command(invitation_cmds, "delete", invitations_delete, "revoke an invitation", fed).add_argument("id")

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

    _add_policy_commands(commands, command)
    _add_messaging_commands(commands, command)

    command(commands, "health", health, "the registry's health and agent count")
    command(commands, "whoami", whoami, "the principal behind the credential: its id owns the agents it creates")
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a bare checkout on PYTHONPATH, never installed
        return "unknown"
