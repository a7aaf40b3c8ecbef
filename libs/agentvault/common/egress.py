"""Outbound HTTP to addresses that users supplied (agents' health-check URLs).

Refuses link-local addresses (where cloud metadata services live), multicast, unspecified and reserved ones,
and optionally private and loopback ones, whatever a name resolves to: the check runs on the addresses the
connection will actually use, so a name that resolves somewhere else at connect time (DNS rebinding) is
caught too. IP literals, which aiohttp never resolves, are checked before the request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult


class EgressRefused(aiohttp.ClientError):
    """The destination address is not one this service may call; `reason` says why."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def refused_reason(address: str, block_private: bool) -> str | None:
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local:
        return "link-local (cloud metadata) addresses are not allowed"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "multicast, unspecified and reserved addresses are not allowed"
    if block_private and (ip.is_private or ip.is_loopback):
        return "private and loopback addresses are not allowed"
    return None


async def allowed_addresses(host: str, port: int, block_private: bool) -> list[str]:
    """The addresses of `host` a connection may use, resolved now (a literal as it is): the one check behind every
    guarded client that picks its own addresses (the httpx/httpcore backends of the A2A transport and the MCP
    client). EgressRefused when none is allowed; OSError when the name cannot be resolved."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        found = [host]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
    allowed = [a for a in found if refused_reason(a, block_private) is None]
    if not allowed:
        reason = (refused_reason(found[0], block_private) if found else None) or "no address"
        raise EgressRefused(f"{host}: {reason}", reason)
    return allowed


class GuardedResolver(AbstractResolver):
    def __init__(self, block_private: bool) -> None:
        self.block_private = block_private
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        allowed = [a for a in answers if refused_reason(a["host"], self.block_private) is None]
        if not allowed:
            reason = refused_reason(answers[0]["host"], self.block_private) if answers else "no address"
            raise OSError(f"{host}: {reason}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def guarded_session(block_private: bool, **kwargs: Any) -> aiohttp.ClientSession:
    """A session whose connections only reach allowed addresses (see GuardedResolver)."""
    connector_args = kwargs.pop("connector_args", {})
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(block_private), **connector_args)
    return aiohttp.ClientSession(connector=connector, **kwargs)


def check_url(url: str, block_private: bool) -> None:
    """Raises EgressRefused for a URL whose host is a literal address that is not allowed."""
    host = urlsplit(url).hostname or ""
    reason = refused_reason(host, block_private)
    if reason:
        raise EgressRefused(reason)
