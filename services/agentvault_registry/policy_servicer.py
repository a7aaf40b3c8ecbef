"""PolicyService: admins write Cedar policies, Explain answers what they would decide, enforcers watch the set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import empty_pb2

from agentvault.common import agents as agent_rules
from agentvault.common import pagination
from agentvault.common.errors import AlreadyExists, NotFound, invalid
from agentvault.common.policy import ACTIONS, PolicyEngine, PolicyError, Target, Trust, validate
from agentvault.common.policy.api import CALLER_TYPES, MAX_DESCRIPTION, MAX_FIELD, MAX_NAME, MAX_TIME
from agentvault.common.policy.api import MAX_ITEMS as MAX_SCOPES
from agentvault.common.policy.enforcer import Enforcer
from agentvault.common.policy.meter import Meter
from agentvault.common.policy.request import Caller, agent_target, capability_target, tool_target
from agentvault.common.policy.sync import load_set
from agentvault.common.principal import ADMIN_SCOPE, POLICIES_ADMIN, POLICIES_READ, Principal
from agentvault.common.redis import follow_channel
from agentvault.common.remote_auth import check_scope
from agentvault.common.server import GrpcServer, background
from agentvault.common.settings import Env
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault_registry.access import (
    AccessServicer,
    AccessSettings,
    ApprovalHub,
    RegistryControlPlane,
    grant_to_proto,
    uuid_field,
)
from agentvault_registry.auth import Authenticator
from agentvault_registry.connection_store import ConnectionStore, TrustRules
from agentvault_registry.grant_store import GrantStore
from agentvault_registry.policy_store import (
    CHANNEL,
    WRITABLE,
    DecisionLogPruner,
    NameTaken,
    PolicyRecord,
    PolicyStore,
)

log = logging.getLogger(__name__)

# A safety net under the Redis channel: a change published while a replica was resubscribing is still seen.
RECHECK_SECONDS = 5.0


def policy_to_proto(record: PolicyRecord) -> ppb.Policy:
    message = ppb.Policy(
        id=str(record.id),
        name=record.name,
        description=record.description,
        text=record.text,
        enabled=record.enabled,
        created_by=record.created_by,
    )
    message.create_time.FromDatetime(record.created_at)
    message.update_time.FromDatetime(record.updated_at)
    return message


class PolicyHub:
    """This replica's copy of the enabled set: reloaded on every change announced on Redis (and checked every few
    seconds), pushed to every watcher, and held in an engine for Explain."""

    def __init__(self, store: PolicyStore, redis: aioredis.Redis, recheck: float = RECHECK_SECONDS) -> None:
        self.store = store
        self.redis = redis
        self.recheck = recheck
        self._checked = time.monotonic()
        self.engine = PolicyEngine()
        self.version = -1
        self.current = ppb.PolicySet()
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()

    async def reload(self) -> None:
        """Reads the set if its version moved, and wakes the watchers."""
        async with self._lock:
            version, records, grants = await self.store.enabled_set()
            if version == self.version:
                return
            current = ppb.PolicySet(
                version=version,
                policies=[policy_to_proto(r) for r in records],
                grants=[grant_to_proto(g) for g in grants],
            )
            try:
                load_set(self.engine, current)
            except PolicyError as exc:
                # Every text was validated when written; only a schema change since could make one invalid.
                log.error("the stored policy set does not load; the registry keeps the previous one: %s", exc)
            self.version = version
            self.current = current
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def ensure_current(self) -> None:
        if await self.store.version() != self.version:
            await self.reload()

    async def changed(self, seen: int) -> ppb.PolicySet:
        """The next set after version `seen` (at once if this replica already has a newer one)."""
        while self.version == seen:
            await self._changed.wait()
        return self.current

    async def announce(self, version: int) -> None:
        """After a change: reload here at once, and tell the other replicas."""
        try:
            await self.redis.publish(CHANNEL, str(version))
        except Exception as exc:  # the others still see it at their next recheck
            log.warning("cannot publish the policy change: %s", exc)
        await self.reload()

    async def run(self) -> None:
        """Follows the change channel until cancelled, resubscribing after any Redis failure."""
        await follow_channel(self.redis, CHANNEL, self, first_delay=0.5, max_delay=10.0)

    # The channel follower's steps (agentvault.common.redis.ChannelListener).

    async def _check(self) -> None:
        self._checked = time.monotonic()
        await self.ensure_current()

    async def on_subscribe(self) -> None:
        await self._check()  # what was published while unsubscribed never arrives

    async def on_message(self, data: Any) -> None:
        await self._check()

    async def on_tick(self) -> None:
        if time.monotonic() - self._checked > self.recheck:
            await self._check()

    async def on_lost(self, exc: Exception) -> None:
        log.warning("policy change channel lost (%s); rechecking the database meanwhile", exc)
        with contextlib.suppress(Exception):
            await self.ensure_current()

    async def on_closed(self) -> None:
        pass


def _check_fields(v: agent_rules.Violations, policy: ppb.Policy, fields: tuple[str, ...]) -> None:
    if "name" in fields:
        agent_rules.check_text(v, "policy.name", policy.name, max_len=MAX_NAME, required=True)
    if "description" in fields:
        agent_rules.check_text(v, "policy.description", policy.description, max_len=MAX_DESCRIPTION, multiline=True)
    if "text" in fields:
        if not policy.text.strip():
            v.add("policy.text", "is required: one Cedar policy")
        else:
            for error in validate(policy.text):
                v.add("policy.text", error)


def _text(v: agent_rules.Violations, path: str, value: str, required: bool = False) -> str:
    if required and not value:
        v.add(path, "is required")
    elif len(value) > MAX_FIELD:
        v.add(path, f"must be at most {MAX_FIELD} characters")
    return value


def explain_inputs(request: ppb.ExplainRequest) -> tuple[Caller, str, Target, dict[str, int], int]:
    """The engine's caller, action, target, counters and time (0: now) of an Explain; every fault as a violation."""
    v = agent_rules.Violations()
    c = request.caller
    caller_type = CALLER_TYPES.get(c.kind or "client")
    if caller_type is None:
        v.add("caller.kind", f"must be one of: {', '.join(CALLER_TYPES)}")
    trust = c.trust_level or Trust.UNTRUSTED.value
    if trust not in set(Trust):
        v.add("caller.trust_level", f"must be one of: {', '.join(Trust)}")
    if len(c.scopes) > MAX_SCOPES:
        v.add("caller.scopes", f"at most {MAX_SCOPES} scopes")
    for index, scope in enumerate(c.scopes[:MAX_SCOPES]):
        _text(v, f"caller.scopes[{index}]", scope)
    for name in ("id", "mesh", "owner"):
        _text(v, f"caller.{name}", getattr(c, name), required=name == "id")
    action = request.action
    if action not in ACTIONS:
        v.add("action", f"must be one of: {', '.join(ACTIONS)}")
    t = request.target
    for name in ("agent_id", "name", "version", "capability_kind", "owner", "mesh"):
        _text(v, f"target.{name}", getattr(t, name), required=name == "agent_id")
    if len(t.tags) > MAX_SCOPES:
        v.add("target.tags", f"at most {MAX_SCOPES} tags")
    for index, tag in enumerate(t.tags[:MAX_SCOPES]):
        _text(v, f"target.tags[{index}]", tag)
    ctx = request.context
    if not 0 <= ctx.time <= MAX_TIME:
        v.add("context.time", f"must be epoch seconds from 0 to {MAX_TIME} (0: now)")
    v.raise_if_any()
    assert caller_type is not None
    caller = Caller(caller_type, c.id, Trust(trust), frozenset(c.scopes), c.mesh, c.owner)
    kind = ACTIONS[action]
    if kind == "Target::Tool":
        target = tool_target(t.agent_id, t.name, t.version, t.owner, t.tags)
    elif kind == "Target::Capability":
        target = capability_target(t.agent_id, t.name, t.capability_kind or "skill", t.version, t.owner, t.tags)
    else:
        target = agent_target(t.agent_id, t.owner, t.tags, t.mesh)
    counters = {
        "payload_size": ctx.payload_size,
        "calls_in_window": ctx.calls_in_window,
        "concurrent_calls": ctx.concurrent_calls,
        "calls_today": ctx.calls_today,
    }
    return caller, action, target, counters, ctx.time


class PolicyServicer(AccessServicer, ppb_grpc.PolicyServiceServicer):
    """PolicyService: the policies here, connections, approvals, grants and permission requests in AccessServicer."""

    def __init__(self, store: PolicyStore, hub: PolicyHub, auth: Authenticator, **access: Any) -> None:
        super().__init__(auth=auth, policies=store, announce=hub.announce, **access)
        self.store = store
        self.hub = hub

    async def _caller(self, context: grpc.aio.ServicerContext, *scopes: str) -> Principal:
        """The caller when it holds one of `scopes` (admin implies each); PermissionDenied naming the first."""
        principal = await self.auth.require(context.invocation_metadata())
        if not any(principal.has_scope(scope) for scope in (*scopes, ADMIN_SCOPE)):
            check_scope(principal, scopes[0])
        return principal

    async def _get(self, policy_id: uuid.UUID) -> PolicyRecord:
        found = await self.store.get(policy_id)
        if found is None:
            raise NotFound(f"policy {policy_id} not found", "POLICY_NOT_FOUND", id=str(policy_id))
        return found

    async def CreatePolicy(self, request: ppb.CreatePolicyRequest, context: grpc.aio.ServicerContext) -> ppb.Policy:
        principal = await self._caller(context, POLICIES_ADMIN)
        v = agent_rules.Violations()
        _check_fields(v, request.policy, WRITABLE)
        v.raise_if_any()
        p = request.policy
        try:
            record, version = await self.store.create(
                p.name.strip(), p.description, p.text, p.enabled, principal.id[:128]
            )
        except NameTaken:
            raise _name_taken(p.name.strip()) from None
        await self.hub.announce(version)
        log.info("policy created", extra={"policy_id": str(record.id), "by": principal.id, "version": version})
        return policy_to_proto(record)

    async def ListPolicies(
        self, request: ppb.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListPoliciesResponse:
        await self._caller(context, POLICIES_ADMIN, POLICIES_READ)
        size = pagination.page_size(request.page_size)
        after = pagination.decode(request.page_token, "policies")
        if after is not None and (len(after) != 1 or not isinstance(after[0], str)):
            raise invalid("page_token", "is not a valid page token")
        records = await self.store.page(size + 1, after[0] if after else None)
        token = pagination.encode([records[size - 1].name], "policies") if len(records) > size else ""
        return ppb.ListPoliciesResponse(policies=[policy_to_proto(r) for r in records[:size]], next_page_token=token)

    async def GetPolicy(self, request: ppb.GetPolicyRequest, context: grpc.aio.ServicerContext) -> ppb.Policy:
        await self._caller(context, POLICIES_ADMIN, POLICIES_READ)
        return policy_to_proto(await self._get(uuid_field("id", request.id)))

    async def UpdatePolicy(self, request: ppb.UpdatePolicyRequest, context: grpc.aio.ServicerContext) -> ppb.Policy:
        principal = await self._caller(context, POLICIES_ADMIN)
        policy_id = uuid_field("policy.id", request.policy.id)
        paths = list(dict.fromkeys(p for p in request.update_mask.paths if p))
        v = agent_rules.Violations()
        for path in paths:
            if path not in WRITABLE:
                v.add("update_mask", f"{path[:64]!r} is not a writable field; writable: {', '.join(WRITABLE)}")
        fields = tuple(paths) or WRITABLE
        _check_fields(v, request.policy, fields)
        v.raise_if_any()
        p = request.policy
        values: dict[str, object] = {"name": p.name.strip(), "description": p.description, "text": p.text}
        values["enabled"] = p.enabled
        await self._get(policy_id)
        try:
            found = await self.store.update(policy_id, {name: values[name] for name in fields})
        except NameTaken:
            raise _name_taken(p.name.strip()) from None
        if found is None:
            raise NotFound(f"policy {policy_id} not found", "POLICY_NOT_FOUND", id=str(policy_id))
        record, version = found
        await self.hub.announce(version)
        log.info("policy updated", extra={"policy_id": str(policy_id), "by": principal.id, "version": version})
        return policy_to_proto(record)

    async def DeletePolicy(
        self, request: ppb.DeletePolicyRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        principal = await self._caller(context, POLICIES_ADMIN)
        policy_id = uuid_field("id", request.id)
        version = await self.store.delete(policy_id)
        if version is None:
            raise NotFound(f"policy {policy_id} not found", "POLICY_NOT_FOUND", id=str(policy_id))
        await self.hub.announce(version)
        log.info("policy deleted", extra={"policy_id": str(policy_id), "by": principal.id, "version": version})
        return empty_pb2.Empty()

    async def Explain(self, request: ppb.ExplainRequest, context: grpc.aio.ServicerContext) -> ppb.ExplainResponse:
        await self._caller(context, POLICIES_ADMIN)
        caller, action, target, counters, at = explain_inputs(request)
        # The set as the database has it now, so an answer never lags a write made through another replica.
        await self.hub.ensure_current()
        engine = self.hub.engine
        clock = engine.clock
        if at:
            # No await until restored: nothing else runs on this loop while the engine reads this clock.
            engine.clock = lambda: float(at)
        try:
            explanation = engine.explain(caller, action, target, counters)
        finally:
            engine.clock = clock
        decision = explanation.decision
        return ppb.ExplainResponse(
            decision=decision.outcome.value,
            deciding_policy_ids=decision.policies,
            reasons=decision.reasons,
            matched_policy_ids=explanation.matched,
            not_applied=[ppb.NotApplied(policy_id=pid, reason=why) for pid, why in explanation.not_applied],
            omitted=explanation.omitted,
            version=explanation.version,
        )

    async def WatchPolicies(
        self, request: ppb.WatchPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.PolicySet]:
        await self._caller(context, POLICIES_READ, POLICIES_ADMIN)
        if self.hub.version < 0:
            await self.hub.reload()
        current = self.hub.current
        yield current
        seen = current.version
        while True:
            current = await self.hub.changed(seen)
            seen = current.version
            yield current


def _name_taken(name: str) -> AlreadyExists:
    return AlreadyExists(f"a policy named {name[:MAX_NAME]!r} already exists", "POLICY_EXISTS")


def trust_rules(env: Env) -> TrustRules:
    up_to = env.str("TRUST_PROMOTE_UP_TO", Trust.BASIC.value)
    if up_to not in set(Trust) or up_to == Trust.BLOCKED:
        raise ValueError("TRUST_PROMOTE_UP_TO must be untrusted, basic or trusted")
    floor = env.str("TRUST_VIOLATION_FLOOR", Trust.UNTRUSTED.value)
    if floor not in set(Trust):
        raise ValueError(f"TRUST_VIOLATION_FLOOR must be one of: {', '.join(Trust)}")
    return TrustRules(
        violation_limit=env.int("TRUST_VIOLATION_LIMIT", 5, minimum=0, maximum=1_000_000),
        floor=Trust(floor),
        violation_window=env.float("TRUST_VIOLATION_WINDOW_SECONDS", 3600.0, minimum=1.0),
        promote_after=env.int("TRUST_PROMOTE_AFTER", 0, minimum=0, maximum=1_000_000_000),
        promote_up_to=Trust(up_to),
    )


async def serve(
    pool: Any,
    redis: aioredis.Redis,
    auth: Authenticator,
    server: GrpcServer,
    stack: contextlib.AsyncExitStack,
    *,
    agents: Any,
    mesh: str,
) -> PolicyServicer:
    """Builds PolicyService with its change listener, the approvals' hub and sweeper, the decision log's pruner and
    the registry's enforcer (of capability requests), and registers it."""
    env = Env()
    retention = env.int("POLICY_DECISION_LOG_RETENTION_DAYS", 30, minimum=1, maximum=3650)
    recheck = env.float("POLICY_RECHECK_SECONDS", RECHECK_SECONDS, minimum=0.1)
    settings = AccessSettings(
        approval_ttl=env.float("APPROVAL_TTL_SECONDS", 3600.0, minimum=1.0),
        sweep_seconds=env.float("APPROVAL_SWEEP_SECONDS", 1.0, minimum=0.05),
        log_allows=env.bool("POLICY_DECISION_LOG_ALLOWS", True),
    )
    store = PolicyStore(pool)
    hub = PolicyHub(store, redis, recheck)
    await hub.reload()
    background(stack, hub.run(), "policy-changes")
    background(stack, DecisionLogPruner(store, retention).run(), "policy-decision-log-prune")
    connections = ConnectionStore(pool, trust_rules(env))
    grants = GrantStore(pool)
    approvals = ApprovalHub(grants, redis, settings)
    background(stack, approvals.run(), "approval-changes")
    background(stack, approvals.sweep(), "approval-sweep")
    control = RegistryControlPlane(connections, grants, store, hub.announce)
    meter = Meter(redis, window_seconds=env.float("POLICY_RATE_WINDOW_SECONDS", 60.0, minimum=1.0))
    enforcer = Enforcer(hub.engine, control, meter=meter, log_allows=settings.log_allows, mesh=mesh)
    servicer = PolicyServicer(
        store,
        hub,
        auth,
        agents=agents,
        connections=connections,
        grants=grants,
        approvals=approvals,
        enforcer=enforcer,
        control=control,
        mesh=mesh,
        settings=settings,
    )
    server.serve(ppb_grpc.add_PolicyServiceServicer_to_server, servicer)
    return servicer
