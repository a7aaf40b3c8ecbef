"""Semantic versions and version constraints (`>=1.2,<2`, `^1.4`, `~1.2`, `1.x`, `a || b`).

A version is ordered by (major, minor, patch, release) where release is 1 for a release and 0 for a
pre-release, so `1.2.0-beta` < `1.2.0`; pre-release identifiers themselves are not ordered further. The same
constraint compiles to a Python predicate and to SQL over the indexed columns of agent_capabilities, and the
tests check the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEMVER = re.compile(
    r"^(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
# A version in a constraint may be partial (`1`, `1.2`) or wildcarded (`1.x`, `1.2.*`).
_PARTIAL = re.compile(r"^v?(\d{1,9}|[xX*])(?:\.(\d{1,9}|[xX*]))?(?:\.(\d{1,9}|[xX*]))?(?:-([0-9A-Za-z.-]+))?$")
_COMPARATOR = re.compile(r"^(>=|<=|>|<|==|=|!=|\^|~=|~)?\s*(.+)$")
MAX_CONSTRAINT_LENGTH = 256

Key = tuple[int, int, int, int]
OPS = (">=", ">", "<=", "<", "=", "!=")


class ConstraintError(ValueError):
    """The constraint cannot be parsed."""


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: str = ""

    @property
    def key(self) -> Key:
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1)

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{self.prerelease}" if self.prerelease else core


def parse_version(text: str) -> Version:
    """Parses a full semantic version; raises ValueError when it is not one."""
    match = SEMVER.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])")
    return Version(int(match.group(1)), int(match.group(2)), int(match.group(3)), match.group(4) or "")


def is_semver(text: str) -> bool:
    # fullmatch: `$` alone would also accept a trailing newline.
    return SEMVER.fullmatch(text) is not None


@dataclass(frozen=True)
class Comparator:
    op: str
    key: Key

    def matches(self, key: Key) -> bool:
        if self.op == ">=":
            return key >= self.key
        if self.op == ">":
            return key > self.key
        if self.op == "<=":
            return key <= self.key
        if self.op == "<":
            return key < self.key
        if self.op == "=":
            return key == self.key
        return key != self.key


@dataclass(frozen=True)
class Constraint:
    """A disjunction of conjunctions of comparators; an empty group list matches everything."""

    groups: tuple[tuple[Comparator, ...], ...]
    text: str

    def matches(self, version: Version | str) -> bool:
        v = parse_version(version) if isinstance(version, str) else version
        key = v.key
        return any(all(c.matches(key) for c in group) for group in self.groups) if self.groups else True

    def to_sql(self, columns: str, first_param: int) -> tuple[str, list[int]]:
        """SQL over a row of columns `(major, minor, patch, release)`; params numbered from first_param."""
        if not self.groups:
            return "TRUE", []
        params: list[int] = []
        ors = []
        for group in self.groups:
            ands = []
            for comp in group:
                n = first_param + len(params)
                ands.append(
                    f"ROW({columns}) {'<>' if comp.op == '!=' else comp.op} ROW(${n}, ${n + 1}, ${n + 2}, ${n + 3})"
                )
                params.extend(comp.key)
            ors.append("(" + " AND ".join(ands) + ")")
        return "(" + " OR ".join(ors) + ")", params


def _partial(text: str) -> tuple[list[int | None], str]:
    match = _PARTIAL.match(text)
    if not match:
        raise ConstraintError(f"{text!r} is not a version")
    parts: list[int | None] = []
    for group in match.groups()[:3]:
        if group is None or group in ("x", "X", "*"):
            parts.append(None)
        else:
            parts.append(int(group))
    # Once a part is a wildcard, everything after it is too (`1.x.3` means `1.x`).
    for i in range(3):
        if parts[i] is None:
            parts[i + 1 :] = [None] * (2 - i)
            break
    return parts, match.group(4) or ""


def _key(parts: list[int | None], pre: str = "") -> Key:
    # `>=1.2.0` excludes 1.2.0-beta (which sorts below 1.2.0); `>=1.2.0-beta` includes it.
    major, minor, patch = (p or 0 for p in parts)
    return (major, minor, patch, 0 if pre else 1)


def _bump(parts: list[int | None], index: int) -> Key:
    values = [p or 0 for p in parts]
    values[index] += 1
    for i in range(index + 1, 3):
        values[i] = 0
    return (values[0], values[1], values[2], 0)


def _comparators(token: str) -> list[Comparator]:
    match = _COMPARATOR.match(token)
    if not match:
        raise ConstraintError(f"cannot parse {token!r}")
    op, rest = match.group(1) or "", match.group(2).strip()
    parts, pre = _partial(rest)
    specified = sum(p is not None for p in parts)
    if op in ("", "=", "=="):
        if specified == 0:
            return []
        if specified == 3:
            return [Comparator("=", _key(parts, pre))]
        return [Comparator(">=", _key(parts)), Comparator("<", _bump(parts, specified - 1))]
    if op == "!=":
        if specified != 3:
            raise ConstraintError(f"{token!r}: != needs a full version")
        return [Comparator("!=", _key(parts, pre))]
    if op == "^":
        if specified == 0:
            return []
        # Caret allows changes that keep the left-most non-zero part (npm semantics).
        index = next((i for i, p in enumerate(parts) if p), specified - 1)
        index = min(index, specified - 1)
        return [Comparator(">=", _key(parts, pre)), Comparator("<", _bump(parts, index))]
    if op in ("~", "~="):
        if specified == 0:
            return []
        # `~1.2.3` and `~=1.2.3` allow patch changes; `~1` allows minor changes; `~=1.2` (PEP 440) too.
        if op == "~=":
            if specified < 2:
                raise ConstraintError(f"{token!r}: ~= needs at least MAJOR.MINOR")
            index = specified - 2
        else:
            index = 0 if specified == 1 else 1
        return [Comparator(">=", _key(parts, pre)), Comparator("<", _bump(parts, index))]
    if specified == 0:
        if op in (">=", "<="):
            return []
        raise ConstraintError(f"{token!r} matches nothing")
    if op == ">=":
        return [Comparator(">=", _key(parts, pre))]
    if op == "<":
        # `<2` excludes 2.0.0's pre-releases too, as npm does.
        major, minor, patch, _ = _key(parts, pre)
        return [Comparator("<", (major, minor, patch, 0))]
    if op == ">":
        if specified == 3:
            return [Comparator(">", _key(parts, pre))]
        return [Comparator(">=", _bump(parts, specified - 1))]
    # op == "<="
    if specified == 3:
        return [Comparator("<=", _key(parts, pre))]
    return [Comparator("<", _bump(parts, specified - 1))]


def parse_constraint(text: str) -> Constraint:
    """Parses `>=1.2,<2`, `>=1.2 <2`, `^1.4`, `~1.2.3`, `~=1.4`, `1.x`, `*`, `=1.2.3`, `!=1.3.0`, `a || b`."""
    if len(text) > MAX_CONSTRAINT_LENGTH:
        raise ConstraintError(f"constraint longer than {MAX_CONSTRAINT_LENGTH} characters")
    stripped = text.strip()
    if not stripped:
        raise ConstraintError("empty constraint")
    groups: list[tuple[Comparator, ...]] = []
    for alternative in stripped.split("||"):
        # Operators may be separated from their version by spaces (`>= 1.2`): glue them back first.
        normalized = re.sub(r"(>=|<=|>|<|==|=|!=|\^|~=|~)\s+", r"\1", alternative.strip())
        tokens = [t for t in re.split(r"[,\s]+", normalized) if t]
        if not tokens:
            raise ConstraintError(f"empty alternative in {text!r}")
        comparators: list[Comparator] = []
        for token in tokens:
            comparators.extend(_comparators(token))
        if not comparators:
            return Constraint((), text)  # one alternative matches everything
        groups.append(tuple(comparators))
    return Constraint(tuple(groups), text)
