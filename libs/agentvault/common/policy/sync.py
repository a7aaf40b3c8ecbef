"""Keeps an enforcing service's PolicyEngine on the registry's policy set, through PolicyService.WatchPolicies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from agentvault.common.policy.engine import Grant, PolicyEngine
from agentvault.common.policy.schema import PolicyError
from agentvault.common.redis import raise_if_cancelling
from agentvault.common.token_source import TokenSource
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc

log = logging.getLogger(__name__)

MIN_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 10.0


def load_set(engine: PolicyEngine, policy_set: ppb.PolicySet) -> None:
    """Puts a PolicySet (policies and grants) into the engine; PolicyError (nothing changed) when a policy does not
    load. Grants follow the set: those gone are revoked, new or changed ones granted. There is no await in here, so
    no decision on this loop sees the policies of one version with the grants of another."""
    engine.replace({p.id: p.text for p in policy_set.policies}, policy_set.version)
    wanted = {
        g.id: Grant(g.id, g.caller, g.action, g.target, g.expire_time.ToSeconds(), g.uses_left or None)
        for g in policy_set.grants
    }
    for held in engine.grants():
        if held.id not in wanted:
            engine.revoke(held.id)
    held_by_id = {g.id: g for g in engine.grants()}
    for grant in wanted.values():
        if held_by_id.get(grant.id) != grant:
            try:
                engine.grant(grant)
            except (ValueError, PolicyError) as exc:
                log.error("grant %s does not load: %s", grant.id, exc)


class PolicySync:
    """Follows WatchPolicies with the service's own token and swaps each set into `engine`.

    The registry sends the whole enabled set at once and again after every change, so a reconnect needs no
    catching up: the first set on the new stream is current. While the registry is unreachable the engine keeps the
    last set it loaded (policies keep being enforced, never dropped to an empty, deny-everything or allow-more
    set), and a set that does not load (a policy this engine's schema refuses) is logged and skipped the same way.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        tokens: TokenSource | None,
        engine: PolicyEngine,
        *,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokens = tokens
        self._stub = ppb_grpc.PolicyServiceStub(channel)
        self._on_change = on_change
        self.version: int | None = None  # the version of the set in force, None until one has loaded
        self.connected = False
        self.loaded = asyncio.Event()

    def apply(self, policy_set: ppb.PolicySet) -> bool:
        """Loads one set into the engine; false (and the previous set stays) when it does not load."""
        if self.version is not None and policy_set.version <= self.version:
            return True  # a replica lagging behind the one we were on: never step back
        try:
            load_set(self.engine, policy_set)
        except PolicyError as exc:
            log.error("policy set %d does not load; keeping version %s: %s", policy_set.version, self.version, exc)
            return False
        self.version = policy_set.version
        self.loaded.set()
        log.info("policy set loaded", extra={"version": self.version, "policies": len(policy_set.policies)})
        if self._on_change is not None:
            self._on_change(policy_set.version)
        return True

    async def _follow(self) -> None:
        token = await self.tokens.token() if self.tokens is not None else ""
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        call = self._stub.WatchPolicies(ppb.WatchPoliciesRequest(), metadata=metadata)
        try:
            async for policy_set in call:
                self.connected = True
                self.apply(policy_set)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.tokens is not None:
                self.tokens.invalidate(token)  # expired or revoked: the next attempt fetches a new one
            raise
        finally:
            self.connected = False
            call.cancel()

    async def run(self) -> None:
        """Follows the stream until cancelled, reconnecting with exponential backoff (reset once a set arrived)."""
        delay = MIN_BACKOFF_SECONDS
        while True:
            before = self.version
            try:
                await self._follow()
                log.warning("the policy watch ended; reconnecting")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("policy watch failed (%s); keeping version %s", exc.code().name, self.version)
            except Exception as exc:
                raise_if_cancelling()
                log.warning("policy watch failed (%s); keeping version %s", exc, self.version)
            if self.version != before:
                delay = MIN_BACKOFF_SECONDS
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
