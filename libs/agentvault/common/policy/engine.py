"""The in-process policy engine: Cedar decisions with deny-wins, ask, grants and explanations."""

from __future__ import annotations

import enum
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

import cedarpy

from agentvault.common.lru import Lru
from agentvault.common.policy.request import Caller, Target, Trust, check, counters, parse_uid, uid
from agentvault.common.policy.schema import COUNTERS, SCHEMA, PolicyError, PolicyMeta, parse_policy

logger = logging.getLogger(__name__)

GRANT_PREFIX = "grant:"
# How Cedar names a policy of surface syntax in its error messages: by position in the text it parsed.
_POSITION = re.compile(r"policy\d+")
# Memory for parsed candidate sets: once across versions (by content), once per version (by request key), and
# the two share their sets, so together they hold at most twice this; parsed caller/target entities half more.
# A pair's set costs ~40 KB in the bench (24 candidates), so this keeps some 1,300 active pairs parsed.
SLICE_CACHE_BYTES = 64 << 20
# What a parsed PolicySet costs per character of its policies' text (25 measured), and what a copy of one costs
# when a pair's own policies are added to it (with_added_str shares the parsed policies; 9.3 measured).
PARSED_BYTES_PER_CHAR = 32
COPIED_BYTES_PER_CHAR = 12
# The counters a usage meter measures (payload_size is the request's own size, known without one).
MEASURED = tuple(name for name in COUNTERS if name != "payload_size")
# The measured counters' part of Cedar's context as JSON: counters() checked the names and that each is an int.
_COUNTERS_JSON = "".join(f',"{name}":%d' for name in COUNTERS) + "}"
_counter_values = itemgetter(*COUNTERS)


class Outcome(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


@dataclass(frozen=True)
class Decision:
    """The answer: the outcome, the policies that decided it, and why, in sentences a caller can be shown."""

    outcome: Outcome
    policies: tuple[str, ...]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Explanation:
    """What would happen now and why: every candidate that applied, and why (some of) the others did not."""

    decision: Decision
    matched: tuple[str, ...]
    not_applied: tuple[tuple[str, str], ...]
    omitted: int  # non-applying policies not listed, to keep Explain's cost bounded
    version: int


@dataclass(frozen=True)
class Grant:
    """A permit for one caller, one action and one target until `expires_at` (epoch s); `uses` None = unlimited."""

    id: str
    caller: str  # a Caller's uid, e.g. Caller::Agent::"a1"
    action: str
    target: str  # a Target's uid
    expires_at: float
    uses: int | None = None

    @classmethod
    def of(
        cls, id: str, caller: Caller, action: str, target: Target, expires_at: float, uses: int | None = None
    ) -> Grant:
        check(action, target)
        return cls(id, caller.uid, action, target.uid, expires_at, uses)

    @property
    def policy_id(self) -> str:
        return GRANT_PREFIX + self.id

    def text(self) -> str:
        # The expiry is in the condition too, so a grant is void at its second even before the engine drops it.
        # Ids are JSON-quoted (as Caller/Target uids are), so no id can add policy text.
        reason = json.dumps(f"grant {self.id}", ensure_ascii=False)
        return (
            f'@reason({reason})\npermit(principal == {self.caller}, action == Action::"{self.action}", '
            f"resource == {self.target}) when {{ context.now < {int(self.expires_at)} }};"
        )


@dataclass
class _Parsed:
    """A parsed PolicySet, and (once an evaluation error needed it) which policy each of Cedar's ids is."""

    handle: Any  # cedarpy.PolicySet
    positions: dict[str, str] | None = None

    def policy_of(self, cedar_id: str) -> str | None:
        if self.positions is None:
            # Slow (milliseconds) but only on an evaluation error, and once per parsed set.
            nodes = self.handle.to_pst().static_policies
            self.positions = {key: node.annotations.get("id", "") for key, node in nodes.items()}
        return self.positions.get(cedar_id)


@dataclass
class _Slice:
    """A request's candidates, the general ones (shared by many requests) first, and the one parsed set that holds
    them all: the general set parsed once, and a copy of it with the request's own policies added, so that a new
    caller or target costs the parse of its own few policies and a decision costs one Cedar call."""

    ids: tuple[str, ...]
    parsed: _Parsed | None  # None when no policy can apply


class _Set:
    """An immutable set of parsed policies, indexed by action, then by the caller or target its scope names."""

    def __init__(self, metas: Mapping[str, PolicyMeta]) -> None:
        self.metas = dict(metas)
        # action (None: any) -> (by caller uid, by target uid, the rest by caller type (None: any))
        self.index: dict[str | None, tuple[dict[str, list[str]], dict[str, list[str]], dict[str | None, list[str]]]]
        self.index = {}
        # The actions (None: any) some policy of which reads a measured usage counter in its condition.
        self.measured: set[str | None] = set()
        for pid, meta in self.metas.items():
            if any(name in meta.condition for name in MEASURED):
                self.measured.update(meta.actions if meta.actions is not None else (None,))
            for action in meta.actions if meta.actions is not None else (None,):
                by_caller, by_target, rest = self.index.setdefault(action, ({}, {}, {}))
                if meta.principal["op"] == "==":
                    by_caller.setdefault(_uid(meta.principal), []).append(pid)
                elif meta.resource["op"] == "==":
                    by_target.setdefault(_uid(meta.resource), []).append(pid)
                else:
                    rest.setdefault(meta.principal.get("entity_type"), []).append(pid)

    def candidates(self, action: str, caller: Caller, target: str) -> tuple[list[str], list[str]]:
        """(general, specific): those naming no one caller or target, shared by many requests, and the others."""
        general: list[str] = []
        specific: list[str] = []
        for key in (action, None):
            bucket = self.index.get(key)
            if bucket is not None:
                specific += bucket[0].get(caller.uid, ())
                specific += bucket[1].get(target, ())
                general += bucket[2].get(None, ())
                general += bucket[2].get(caller.type, ())
        return general, specific


@dataclass
class _State:
    policies: _Set
    grants: _Set
    version: int
    next_expiry: float
    # (action, caller uid, target uid) -> its slice: the one dict lookup on the hot path.
    slices: Lru[tuple[str, str, str], _Slice]

    def meta(self, pid: str) -> PolicyMeta:
        return (self.grants if pid.startswith(GRANT_PREFIX) else self.policies).metas[pid]


def _uid(scope: dict[str, Any]) -> str:
    entity = scope["entity"]
    return uid(entity["type"], entity["id"])


class PolicyEngine:
    """Decides allow / deny / ask for one request from Cedar policies, in-process.

    The rule, on the policies that apply (scope matches, condition true): any forbid -> deny (deny wins); else if
    every applying permit is annotated @decision("ask") -> ask (allowed only after an approval); else (a plain
    permit or a grant applies) -> allow; nothing applies -> deny (default deny, so external callers start
    untrusted and refused). A forbid whose condition fails to evaluate counts as applying, and a blocked caller
    is denied whatever the policies say.

    Cedar evaluates every policy of the set it is given (1-3 microseconds each here), so the engine hands it only
    the candidates for this request: policies indexed by action, then by the caller or target their scope names
    (`principal ==`, `resource ==`: this request's own), else by the caller type they name (`principal is`), if
    any (general). A request's candidates are one parsed set, so a decision is one Cedar call (a call costs some
    30 microseconds before any policy, 20 of them reading the context): the general ones are parsed once (a few
    sets, by action and caller type) and a pair's own are added to a copy of that set, which shares the parsed
    general policies, so a pair costs its own policies plus about 10 bytes per character of the general ones
    (some 40 KB in the bench; parsing the pair's whole set would cost 2.5 times that). Sets are cached by their
    exact content, within `cache_bytes`.

    `replace` swaps the whole set atomically (one reference assignment); policies are validated first and the old
    set stays in force if any is invalid. Grants (`grant`, `revoke`) are generated permits that expire and may be
    one-time; they are dropped once expired, and a one-time grant is consumed by the allow it decides. The engine
    is meant for one event loop; grant bookkeeping is under a lock so worker threads cannot double-spend a use.
    """

    def __init__(
        self,
        policies: Mapping[str, str] | None = None,
        *,
        version: int = 0,
        clock: Callable[[], float] = time.time,
        cache_bytes: int = SLICE_CACHE_BYTES,
    ) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        # The clock's part of the context as JSON, for the second it was built in (one gmtime a second).
        self._clock_json: tuple[int | None, str] = (None, "")
        self._grants: dict[str, Grant] = {}
        self._cache_bytes = cache_bytes
        self._handles: Lru[tuple[tuple[str, str], ...], _Parsed] = Lru(8192, budget=cache_bytes)
        self._entities: Lru[tuple[Caller, Target], Any] = Lru(8192, budget=cache_bytes // 2)
        self._state = _State(_Set({}), _Set({}), version, float("inf"), self._memo())
        self.replace(policies or {}, version)

    def _memo(self) -> Lru[tuple[str, str, str], _Slice]:
        return Lru(8192, budget=self._cache_bytes)

    @property
    def version(self) -> int:
        return self._state.version

    def policy_ids(self) -> list[str]:
        return list(self._state.policies.metas)

    def measures(self, action: str) -> bool:
        """Whether a policy that may apply to `action` reads a usage counter (calls_in_window, concurrent_calls,
        calls_today): when none does, an enforcer need not count the call (payload_size is always given)."""
        measured = self._state.policies.measured
        return None in measured or action in measured

    def replace(self, policies: Mapping[str, str], version: int | None = None) -> int:
        """Swaps in a new policy set (id -> Cedar text); PolicyError (the first invalid one) leaves the old one."""
        old = self._state.policies.metas
        metas: dict[str, PolicyMeta] = {}
        for pid, text in policies.items():
            if not pid or pid.startswith(GRANT_PREFIX):
                raise PolicyError(pid, [f"a policy id is not empty and does not start with {GRANT_PREFIX!r}"])
            kept = old.get(pid)
            metas[pid] = kept if kept is not None and kept.text == text else parse_policy(pid, text)
        with self._lock:
            state = self._state
            new_version = state.version + 1 if version is None else version
            self._state = _State(_Set(metas), state.grants, new_version, state.next_expiry, self._memo())
        return new_version

    # Grants ---------------------------------------------------------------------------------------------------

    def grant(self, grant: Grant) -> None:
        """Adds (or replaces) a grant; PolicyError when its parts do not make a valid policy."""
        if grant.uses is not None and grant.uses < 1:
            raise ValueError("a grant's uses is at least 1 (None for unlimited)")
        # Its caller and target are written into Cedar text: only uids as `uid` writes them, nothing more.
        if parse_uid(grant.caller) is None or parse_uid(grant.target) is None:
            raise ValueError('a grant\'s caller and target are entity uids, e.g. Caller::Agent::"a1"')
        parse_policy(grant.policy_id, grant.text())
        with self._lock:
            self._grants[grant.id] = grant
            self._rebuild_grants()

    def revoke(self, grant_id: str) -> bool:
        with self._lock:
            found = self._grants.pop(grant_id, None) is not None
            if found:
                self._rebuild_grants()
            return found

    def grants(self) -> list[Grant]:
        return list(self._grants.values())

    def _rebuild_grants(self, now: float | None = None) -> None:
        """Under the lock: drops expired grants and swaps in a new grant set."""
        now = self.clock() if now is None else now
        self._grants = {k: g for k, g in self._grants.items() if g.expires_at > now}
        old = self._state.grants.metas
        metas: dict[str, PolicyMeta] = {}
        for g in self._grants.values():
            kept = old.get(g.policy_id)
            metas[g.policy_id] = (
                kept if kept is not None and kept.text == g.text() else parse_policy(g.policy_id, g.text())
            )
        expiry = min((g.expires_at for g in self._grants.values()), default=float("inf"))
        state = self._state
        self._state = _State(state.policies, _Set(metas), state.version, expiry, self._memo())

    def _consume(self, grant_ids: Iterable[str]) -> None:
        """One use of the soonest-expiring of the limited grants that allowed a call; at zero it is gone."""
        with self._lock:
            live = [self._grants[g[len(GRANT_PREFIX) :]] for g in grant_ids if g[len(GRANT_PREFIX) :] in self._grants]
            if not live or any(g.uses is None for g in live):
                return
            spent = min(live, key=lambda g: g.expires_at)
            assert spent.uses is not None
            if spent.uses > 1:
                self._grants[spent.id] = replace(spent, uses=spent.uses - 1)
            else:
                del self._grants[spent.id]
                self._rebuild_grants()

    # Decisions ------------------------------------------------------------------------------------------------

    def decide(self, caller: Caller, action: str, target: Target, context: Mapping[str, int] | None = None) -> Decision:
        """Allow, deny or ask for `caller` doing `action` to `target` now; an allow spends a one-time grant."""
        return self._decide(caller, action, target, context, consume=True)[0]

    def preview(
        self, caller: Caller, action: str, target: Target, context: Mapping[str, int] | None = None
    ) -> Decision:
        """What `decide` would answer now, spending nothing: a one-time grant that would allow keeps its use. For
        "would this be allowed" questions (which tools a caller may see): an allow here is no permission to act,
        the act itself goes through `decide`. Usage counters are what `context` says (none: all zero)."""
        return self._decide(caller, action, target, context, consume=False)[0]

    def _context(self, measured: Mapping[str, int] | None) -> tuple[float, str]:
        """Now, and Cedar's context as JSON text (built once for every call a request makes)."""
        now = self.clock()
        second = int(now)
        built, clock = self._clock_json
        if built != second:
            utc = time.gmtime(now)
            clock = f'{{"now":{second},"hour":{utc.tm_hour},"weekday":{utc.tm_wday}'
            self._clock_json = (second, clock)
        return now, clock + _COUNTERS_JSON % _counter_values(counters(measured))

    def _current(self, now: float) -> _State:
        state = self._state
        if now >= state.next_expiry:
            with self._lock:
                self._rebuild_grants(now)
            state = self._state
        return state

    def _slice(self, state: _State, action: str, caller: Caller, target: str) -> _Slice:
        key = (action, caller.uid, target)
        found = state.slices.get(key)
        if found is not None:
            return found
        general, specific = state.policies.candidates(action, caller, target)
        specific += state.grants.candidates(action, caller, target)[1]
        general, specific = list(dict.fromkeys(general)), list(dict.fromkeys(specific))
        ids = general + specific
        parsed = self._handle(state, ids, shared=len(general)) if ids else None
        # The general sets are a few per action and caller type; what grows with requests is a set per pair.
        weight = 64 + sum(len(pid) + 64 for pid in ids) + (_weight(state, general, specific) if specific else 0)
        return state.slices.put(key, _Slice(tuple(ids), parsed), weight)

    def _handle(self, state: _State, ids: list[str], shared: int = 0) -> _Parsed:
        """The parsed PolicySet of exactly these policies, each under its @id, cached by their content; the first
        `shared` are parsed (and cached) as a set of their own and the others added to a copy of it, a third of
        the time and 40% of the memory of parsing them all."""
        texts = tuple((pid, state.meta(pid).tagged) for pid in ids)
        found = self._handles.get(texts)
        if found is None:
            if 0 < shared < len(ids):
                base = self._handle(state, ids[:shared])
                # Equivalent to parsing the concatenated text (Cedar's positional ids are renumbered to follow).
                handle = base.handle.with_added_str("\n".join(t for _, t in texts[shared:]))
                weight = _weight(state, ids[:shared], ids[shared:])
            else:
                handle = cedarpy.PolicySet.from_str("\n".join(t for _, t in texts))
                weight = _weight(state, (), ids)
            found = self._handles.put(texts, _Parsed(handle), weight)
        return found

    def _entities_for(self, caller: Caller, target: Target) -> Any:
        key = (caller, target)
        found = self._entities.get(key)
        if found is None:
            text = json.dumps([caller.entity(), target.entity()])
            # Typed by the schema: checked once here, and Cedar evaluates typed attributes about 10% faster.
            # A parsed pair costs about 8 KB here, some 23 bytes per character of its JSON.
            found = self._entities.put(key, cedarpy.Entities.from_json_str(text, SCHEMA), len(text) * 24)
        return found

    def _evaluate(self, handle: Any, caller: Caller, action: str, target: Target, context: str) -> Any:
        # The context as JSON text: cedarpy would serialize a dict on each call.
        request = {
            "principal": {"type": caller.type, "id": caller.id},
            "action": {"type": "Action", "id": action},
            "resource": {"type": target.type, "id": target.id},
            "context": context,
        }
        return cedarpy.is_authorized(request, handle, self._entities_for(caller, target))

    def _decide(
        self, caller: Caller, action: str, target: Target, measured: Mapping[str, int] | None, *, consume: bool
    ) -> tuple[Decision, _State, _Slice, str]:
        check(action, target)
        now, context = self._context(measured)
        state = self._current(now)
        piece = self._slice(state, action, caller, target.uid)
        if caller.trust is Trust.BLOCKED:
            # What blocked means does not depend on anyone having written a forbid for it.
            blocked = f"{caller.uid} is blocked on this connection"
            return Decision(Outcome.DENY, (), (blocked,)), state, piece, context
        applied: list[str] = []
        denied: list[str] = []
        broken: list[str] = []
        if piece.parsed is not None:
            result = self._evaluate(piece.parsed.handle, caller, action, target, context)
            # Cedar names every satisfied forbid when it denies, every satisfied permit when it allows, in no
            # particular order: they are listed in the slice's (general ones first).
            named = sorted(_applied(result), key=piece.ids.index)
            (denied if result.decision is cedarpy.Decision.Deny else applied).extend(named)
            broken = sorted(self._broken_forbids(state, piece.parsed, result.diagnostics.errors), key=piece.ids.index)
        if denied or broken:
            why = [_say(state.meta(p), p, "forbids this") for p in denied]
            why += [f"policy {p!r} forbids this (its condition could not be evaluated)" for p in broken]
            return Decision(Outcome.DENY, tuple(denied + broken), tuple(why)), state, piece, context
        if not applied:
            return self._default_deny(caller, action, target), state, piece, context
        plain = [p for p in applied if not state.meta(p).ask]
        if not plain:
            asks = tuple(_say(state.meta(p), p, "allows this after an approval") for p in applied)
            return Decision(Outcome.ASK, tuple(applied), asks), state, piece, context
        if consume and all(p.startswith(GRANT_PREFIX) for p in plain):
            self._consume(plain)
        allows = tuple(_say(state.meta(p), p, "allows this") for p in plain)
        return Decision(Outcome.ALLOW, tuple(plain), allows), state, piece, context

    @staticmethod
    def _default_deny(caller: Caller, action: str, target: Target) -> Decision:
        return Decision(Outcome.DENY, (), (f"no policy allows {caller.uid} to {action} {target.uid} (default deny)",))

    @staticmethod
    def _broken_forbids(state: _State, parsed: _Parsed, errors: list[Any]) -> list[str]:
        broken = []
        for error in errors:
            pid = _failed_policy(parsed, error)
            if pid is not None:
                logger.warning("policy %s failed to evaluate: %s", pid, error)
                if state.meta(pid).effect == "forbid":
                    broken.append(pid)
        return broken

    # Explain --------------------------------------------------------------------------------------------------

    def explain(
        self,
        caller: Caller,
        action: str,
        target: Target,
        context: Mapping[str, int] | None = None,
        *,
        limit: int = 20,
    ) -> Explanation:
        """What `decide` would answer now (spending nothing), every candidate that applies, and why up to `limit`
        others do not: a scope that names another caller, action or target, or a condition that is false.

        Two more Cedar calls than a decision: the candidate permits alone (Cedar's reasons for an allow are every
        satisfied permit) and the candidate forbids alone (for a deny, every satisfied forbid). The rest of the set
        is only scope-checked, in Python, and listed up to `limit`.
        """
        decision, state, piece, ctx = self._decide(caller, action, target, context, consume=False)
        matched: list[str] = []
        failed: dict[str, str] = {}
        for effect in ("permit", "forbid"):
            subset = [pid for pid in piece.ids if state.meta(pid).effect == effect]
            if not subset:
                continue
            parsed = self._handle(state, subset)
            result = self._evaluate(parsed.handle, caller, action, target, ctx)
            matched += _applied(result)
            for error in result.diagnostics.errors:
                pid = _failed_policy(parsed, error)
                if pid is not None:
                    failed[pid] = str(error)
                    if effect == "forbid":  # as in decide: a forbid that cannot be evaluated applies
                        matched.append(pid)
        applied = set(matched)
        in_slice = set(piece.ids)
        not_applied: list[tuple[str, str]] = []
        total = len(state.policies.metas) + len(state.grants.metas)
        others = (pid for source in (state.policies, state.grants) for pid in source.metas if pid not in in_slice)
        for pid in itertools.chain((p for p in piece.ids if p not in applied), others):
            if len(not_applied) >= limit:
                break
            meta = state.meta(pid)
            why = _scope_miss(meta, caller, action, target)
            if why is None and pid in failed:
                why = f"its condition failed to evaluate: {failed[pid]}"
            elif why is None:
                why = f"condition false: {meta.condition}" if pid in in_slice else "not a candidate"
            not_applied.append((pid, why))
        omitted = total - len(applied) - len(not_applied)
        return Explanation(decision, tuple(matched), tuple(not_applied), omitted, state.version)


def _applied(result: Any) -> list[str]:
    """The policies Cedar's answer names (every satisfied permit for an allow, every satisfied forbid for a deny)."""
    names = result.diagnostics.id_annotations_by_reason
    return [names[r] for r in result.diagnostics.reasons if r in names]


def _failed_policy(parsed: _Parsed, error: Any) -> str | None:
    match = _POSITION.search(str(error))
    return parsed.policy_of(match.group(0)) if match else None


def _weight(state: _State, copied: Iterable[str], parsed: Iterable[str]) -> int:
    """What a PolicySet costs in memory: a copy of a parsed set of the `copied` policies plus the `parsed` ones."""
    chars = state.meta
    return COPIED_BYTES_PER_CHAR * sum(len(chars(p).tagged) for p in copied) + PARSED_BYTES_PER_CHAR * sum(
        len(chars(p).tagged) for p in parsed
    )


def _say(meta: PolicyMeta, pid: str, what: str) -> str:
    return f"policy {pid!r} {what}" + (f": {meta.reason}" if meta.reason else "")


def _entity_miss(label: str, scope: dict[str, Any], type_: str, id_: str) -> str | None:
    """Why an entity scope (principal or resource) does not match; mesh entities have no parents, so `in` is ==."""
    op = scope["op"]
    if op == "All":
        return None
    if op == "is" and scope["entity_type"] != type_:
        return f"its {label} must be a {scope['entity_type']}, this one is a {type_}"
    named = scope.get("entity") or scope.get("in", {}).get("entity")
    if named is not None and (named["type"], named["id"]) != (type_, id_):
        return f"it names {label} {uid(named['type'], named['id'])}, not {uid(type_, id_)}"
    return None


def _scope_miss(meta: PolicyMeta, caller: Caller, action: str, target: Target) -> str | None:
    if meta.actions is not None and action not in meta.actions:
        return f"it is about action {' or '.join(meta.actions)}, not {action}"
    return _entity_miss("principal", meta.principal, caller.type, caller.id) or _entity_miss(
        "resource", meta.resource, target.type, target.id
    )
