"""Outbound HTTP to addresses that users supplied (agents' health-check URLs).

Refuses link-local addresses (where cloud metadata services live), multicast, unspecified and reserved ones,
and optionally private and loopback ones, whatever a name resolves to: the check runs on the addresses the
connection will actually use, so a name that resolves somewhere else at connect time (DNS rebinding) is
caught too. IP literals, which aiohttp never resolves, are checked before the request.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult


class EgressRefused(aiohttp.ClientError):
    """The destination address is not one this service may call."""


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
