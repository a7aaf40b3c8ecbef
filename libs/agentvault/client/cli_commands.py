"""The `agentvault` commands: each turns the parsed flags into one client call and returns its reply as a dict."""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from agentvault.client.cli_output import render
from agentvault.client.convert import enum_number, from_dict, parse_capability, parse_endpoint, to_dict
from agentvault.client.discovery import DiscoveryClient, DiscoveryFilters
from agentvault.client.federation import FederationClient
from agentvault.client.identity import IdentityClient
from agentvault.client.messaging import MAX_AWAIT_SECONDS, MessagingClient
from agentvault.client.policy import Explanation, PolicyClient
from agentvault.client.registry import AgentFilters, RegistryClient
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.registry.v1 import registry_service_pb2 as pb

# Scalar agent fields settable from a flag of the same name (with - for _).
SCALAR_FIELDS = ("did", "name", "version", "description", "agent_type", "sharing", "health_check_url")
LIST_FIELDS = {"tags": "tag", "capabilities": "capability", "endpoints": "endpoint"}
WRITABLE_FIELDS = (*SCALAR_FIELDS, *LIST_FIELDS)


class UsageError(Exception):
    """Bad command-line input, found after argparse accepted the syntax."""


# Each command's handler takes the client its command names (RegistryClient unless told otherwise) and returns the
# reply to print, or None when it printed its output itself as it came (a watch).
Handler = Callable[[Any, argparse.Namespace], Awaitable[dict[str, Any] | None]]


# --------------------------------------------------------------------------------------------- input


def _read_text(path: str) -> str:
    """The text of the file at `path`, or of stdin for "-"."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{'stdin' if path == '-' else path}: not UTF-8 text") from None


def _read_json(path: str) -> Any:
    text = _read_text(path)
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


async def agents_import_card(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    if (args.url is None) == (args.file is None):
        raise UsageError("give the card's URL or --file PATH (one of them)")
    card = json.dumps(_read_json(args.file)) if args.file is not None else ""
    agent = await client.import_agent_card(card_url=args.url or "", card=card, did=args.did, sharing=args.sharing or "")
    return to_dict(agent)


async def agents_card(client: RegistryClient, args: argparse.Namespace) -> dict[str, Any]:
    # The REST route answers with the card itself (response_body: "card"), so print that.
    return dict(to_dict(await client.get_agent_card(args.id)).get("card") or {})


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
    for name in ("name", "registry_url", "api_key", "invitation", "grpc_endpoint", "require_mtls", "is_active"):
        value = getattr(args, name, None)
        if name in ("api_key", "invitation") and value == "-":  # kept out of the process list and shell history
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
    if args.invitation is None and (args.registry_url is None or args.api_key is None):
        raise UsageError("give --invitation CODE, or --registry-url and --api-key")
    if args.invitation is not None and args.api_key is not None:
        raise UsageError("--invitation and --api-key exclude each other: with an invitation the tokens are agreed")
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


async def invitations_create(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.create_invitation(args.name, ttl_seconds=args.ttl))


async def invitations_list(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    invitations = [i async for i in client.iter_invitations()]
    return to_dict(fpb.ListFederationInvitationsResponse(invitations=invitations))


async def invitations_delete(client: FederationClient, args: argparse.Namespace) -> dict[str, Any]:
    await client.delete_invitation(args.id)
    return {}


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


# ------------------------------------------------------------------------------------ policy control plane


def _policy_text(args: argparse.Namespace) -> str | None:
    if args.text is not None and args.text_file is not None:
        raise UsageError("--text and --text-file exclude each other")
    if args.text_file is not None:
        return _read_text(args.text_file)
    return args.text


def _policy_from_args(args: argparse.Namespace) -> tuple[ppb.Policy, list[str]]:
    """The policy the flags describe, and the fields they set (the update mask)."""
    policy = ppb.Policy()
    paths: list[str] = []
    text = _policy_text(args)
    for name, value in (("name", args.name), ("description", args.description), ("text", text)):
        if value is not None:
            setattr(policy, name, value)
            paths.append(name)
    if args.enabled is not None:
        policy.enabled = args.enabled
        paths.append("enabled")
    return policy, paths


async def policies_create(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    if args.text is None and args.text_file is None:
        raise UsageError("give the policy's Cedar text: --text-file PATH (- for stdin) or --text TEXT")
    policy, _ = _policy_from_args(args)
    return to_dict(await client.create_policy(policy))


async def policies_list(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(ppb.ListPoliciesResponse(policies=[p async for p in client.iter_policies()]))


async def policies_get(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.get_policy(args.id))


async def policies_update(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    policy, paths = _policy_from_args(args)
    if not paths:
        raise UsageError("nothing to update: give at least one of --name, --description, --text(-file), --enable")
    policy.id = args.id
    return to_dict(await client.update_policy(policy, paths))


async def policies_delete(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    await client.delete_policy(args.id)
    return {}


def _epoch(value: str) -> int:
    """--at: epoch seconds, or an ISO 8601 time (UTC unless it names its offset)."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at: expected epoch seconds or an ISO 8601 time, got {value!r}") from None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


async def policies_explain(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    what = Explanation(
        caller_id=args.caller_id,
        caller_kind=args.caller_kind,
        trust_level=args.trust,
        scopes=args.scope or (),
        action=args.action,
        agent_id=args.agent_id,
        name=args.name,
        version=args.version,
        capability_kind=args.capability_kind,
        payload_size=args.payload_size,
        time=_epoch(args.at) if args.at else 0,
    )
    return to_dict(await client.explain(what))


async def approvals_list(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    approvals = [a async for a in client.iter_approvals(status=args.status)]
    return to_dict(ppb.ListApprovalsResponse(approvals=approvals))


async def approvals_get(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.get_approval(args.id))


async def approvals_approve(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.approve(args.id, duration_seconds=args.duration, uses=args.uses, note=args.note))


async def approvals_deny(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.deny(args.id, note=args.note))


def _event_line(event: dict[str, Any], output: str) -> str:
    if output == "json":
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    approval = event.get("approval", {})
    cells = [event.get("event", ""), *(str(approval.get(k, "")) for k in ("id", "status", "caller", "target"))]
    return "  ".join(cells)


async def approvals_watch(client: PolicyClient, args: argparse.Namespace) -> None:
    """Prints each event as it comes, one line each (JSON, or -o table's fields), until the stream ends."""
    async for event in client.watch_approvals(include_answered=args.include_answered):
        print(_event_line(to_dict(event), args.output), flush=True)


async def grants_list(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(ppb.ListGrantsResponse(grants=[g async for g in client.iter_grants(include_ended=args.all)]))


async def grants_revoke(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.revoke_grant(args.id))


async def connections_list(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    connections = [c async for c in client.iter_connections(trust_level=args.trust_level, agent_id=args.agent_id)]
    return to_dict(ppb.ListConnectionsResponse(connections=connections))


async def connections_get(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.get_connection(args.id))


async def connections_set_trust(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.set_trust_level(args.id, args.level, args.reason))


async def connections_changes(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(ppb.ListTrustChangesResponse(changes=[c async for c in client.iter_trust_changes(args.id)]))


async def decisions_list(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    decisions = []
    async for decision in client.iter_decisions(outcome=args.outcome, page_size=min(args.limit, 500)):
        decisions.append(decision)
        if len(decisions) >= args.limit:
            break
    return to_dict(ppb.ListDecisionsResponse(decisions=decisions))


async def capabilities_request(client: PolicyClient, args: argparse.Namespace) -> dict[str, Any]:
    decision = await client.request_capability(
        args.agent_id,
        args.capability,
        kind=args.kind,
        version_constraint=args.version_constraint,
        purpose=args.purpose,
        max_calls=args.max_calls,
        duration_seconds=args.duration,
        wait_seconds=args.wait,
    )
    return to_dict(decision)


# ------------------------------------------------------------------------------------------ messaging


def _message_from_args(args: argparse.Namespace) -> mpb.Message:
    """The message `messages send` describes: one part (--text, --data or --file), its recipient and ids."""
    if not args.to and not args.reply_to:
        raise UsageError("give the recipient with --to AGENT_ID (or answer a message with --reply-to ID)")
    message = mpb.Message(conversation_id=args.conversation, in_reply_to=args.reply_to, idempotency_key=args.key)
    if args.to:
        # A DID names the agent as well as its UUID does; the service looks either up.
        recipient = mpb.Party(did=args.to) if args.to.startswith("did:") else mpb.Party(agent_id=args.to)
        message.recipient.CopyFrom(recipient)
    for item in args.header or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--header: expected NAME=VALUE, got {item!r}")
        message.headers[name] = value
    part = message.parts.add()
    if args.text is not None:
        part.text = args.text
    elif args.data is not None:
        try:
            json_format.ParseDict(json.loads(args.data), part.data)
        except (json.JSONDecodeError, json_format.ParseError) as exc:
            raise UsageError(f"--data: invalid JSON: {exc}") from None
    else:
        part.raw = _read_bytes(args.file)
        if args.file != "-":
            part.filename = os.path.basename(args.file)
            part.media_type = mimetypes.guess_type(args.file)[0] or "application/octet-stream"
    return message


def _read_bytes(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


async def messages_send(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    """Sends; with --wait-reply also waits for the answer: `reply` is the reply, or null when none came in time."""
    # Checked here, since the server could only say so after the message was sent.
    if args.wait_reply is not None and not 0 <= args.wait_reply <= MAX_AWAIT_SECONDS:
        raise UsageError(f"--wait-reply: must be from 0 to {MAX_AWAIT_SECONDS} seconds")
    sent = await client.send_message(_message_from_args(args))
    data = to_dict(sent)
    if args.wait_reply is not None:
        reply = await client.await_reply(sent.message.id, wait_seconds=args.wait_reply)
        data["reply"] = to_dict(reply) if reply is not None else None
    return data


async def messages_get(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.get_message(args.id))


async def messages_list(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    messages = []
    async for message in client.iter_messages(
        conversation_id=args.conversation,
        correlation_id=args.correlation,
        agent_id=args.agent,
        status=args.status,
        page_size=min(args.limit, 500),
    ):
        messages.append(message)
        if len(messages) >= args.limit:
            break
    return to_dict(mpb.ListMessagesResponse(messages=messages))


def _party(party: dict[str, Any]) -> str:
    return str(party.get("agent_id") or party.get("did") or party.get("principal_id") or "")


def _line(data: dict[str, Any], output: str, cells: Sequence[Any]) -> str:
    """One line of a stream: compact JSON, or (-o table) the cells that matter, two spaces apart."""
    if output == "json":
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return "  ".join(str(c) for c in cells)


async def messages_watch(client: MessagingClient, args: argparse.Namespace) -> None:
    """Prints each status change as it comes, one line each, until the stream ends or Ctrl-C."""
    async for event in client.watch_messages(id=args.id, conversation_id=args.conversation, agent_id=args.agent):
        data = to_dict(event)
        m = data.get("message", {})
        cells = (data.get("status"), m.get("id"), _party(m.get("sender", {})), _party(m.get("recipient", {})),
                 m.get("conversation_id"), m.get("status_reason"))  # fmt: skip
        print(_line(data, args.output, cells), flush=True)


def _text(message: dict[str, Any]) -> str:
    """A delivery's content on one line: its text parts, else what kinds of parts it has."""
    parts = message.get("parts", [])
    texts = [p["text"] for p in parts if "text" in p]
    summary = " ".join(texts) if texts else ",".join(next(iter(p), "") for p in parts)
    return json.dumps(summary, ensure_ascii=False)


async def inbox_receive(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any] | None:
    """Takes messages from an inbox; with --ack prints them first and then acknowledges each."""
    deliveries = await client.receive_messages(
        agent_id=args.agent, max_messages=args.max, visibility_timeout_seconds=args.visibility, wait_seconds=args.wait
    )
    data = to_dict(mpb.ReceiveMessagesResponse(deliveries=deliveries))
    if not args.ack:
        return data
    # Printed before they are acknowledged: an ack is the promise that the message was handled.
    print(render(data, args.output, args.columns), flush=True)
    for delivery in deliveries:
        await client.ack(delivery.message.id, delivery.receipt)
    return None


async def inbox_ack(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    await client.ack(args.message_id, args.receipt)
    return {}


async def inbox_nack(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    await client.nack(
        args.message_id, args.receipt, delay_seconds=args.delay, reason=args.reason, dead_letter=args.dead_letter
    )
    return {}


async def inbox_stream(client: MessagingClient, args: argparse.Namespace) -> None:
    """Prints each delivery as it arrives, one line each (acknowledged after printing with --ack), until Ctrl-C."""
    async for delivery in client.stream_inbox(
        agent_id=args.agent, max_in_flight=args.max_in_flight, visibility_timeout_seconds=args.visibility
    ):
        data = to_dict(delivery)
        m = data.get("message", {})
        cells = (m.get("id"), data.get("attempt"), data.get("receipt"), _party(m.get("sender", {})),
                 m.get("conversation_id"), _text(m))  # fmt: skip
        print(_line(data, args.output, cells), flush=True)
        if args.ack:
            await client.ack(delivery.message.id, delivery.receipt)


async def dead_letters_list(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    messages = []
    async for message in client.iter_dead_letters(agent_id=args.agent, page_size=min(args.limit, 500)):
        messages.append(message)
        if len(messages) >= args.limit:
            break
    return to_dict(mpb.ListDeadLettersResponse(messages=messages))


async def dead_letters_replay(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    return to_dict(await client.replay_dead_letter(args.id))


def _time(value: str, flag: str) -> datetime:
    """An RFC 3339 / ISO 8601 time (UTC unless it names its offset)."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(f"{flag}: expected an RFC 3339 time like 2026-01-31T12:00:00Z, got {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def dead_letters_purge(client: MessagingClient, args: argparse.Namespace) -> dict[str, Any]:
    before = _time(args.before, "--before") if args.before else None
    if not args.yes:
        which = "every dead letter" if not (args.agent or before) else "the dead letters named"
        raise UsageError(f"this deletes {which} for good: add --yes to go ahead")
    return {"purged": await client.purge_dead_letters(agent_id=args.agent, before=before)}


# Handlers that print as they go until the server ends them or Ctrl-C, which ends them cleanly (exit 0).
STREAMS: tuple[Handler, ...] = (approvals_watch, messages_watch, inbox_stream)
