"""A mesh with messaging, policies and an admin and a member credential, for the console's tests."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, eventually
from ..messaging.conftest import MESSAGING_ENV, POLICIES, LocalAgent, Net, local_agent, policy, text_message
from ..tools.conftest import TOOLS_ENV

COOKIE = "agentvault_console"
CSRF_HEADER = "X-CSRF-Token"


@dataclass
class ConsoleNet:
    net: Net
    member_token: str

    @property
    def admin_token(self) -> str:
        return self.net.mesh.admin_token

    def url(self, path: str = "") -> str:
        return self.net.mesh.url(path)


@pytest.fixture(scope="package")
async def console(mesh_factory: MeshFactory) -> AsyncIterator[ConsoleNet]:
    edge = free_port()
    env = {
        "EDGE_PORT": str(edge),
        "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        "MESSAGING_METRICS_PORT": str(free_port()),
        # Peers checked each second and down after two failures: a stopped peer shows within seconds.
        "FEDERATION_HEALTH_CHECK_INTERVAL": "1",
        "FEDERATION_UNHEALTHY_THRESHOLD": "2",
        "HEALTH_CHECK_TIMEOUT": "0.5",
        "HEALTH_MONITOR_METRICS_PORT": str(free_port()),
        # The MCP tool catalog scanned often, so a registered MCP server's tools are listed soon.
        **TOOLS_ENV,
    }
    mesh = mesh_factory(name="console", env={**MESSAGING_ENV, **env}, keep=True)
    async with (
        grpc.aio.insecure_channel(mesh.address("registry")) as reg,
        grpc.aio.insecure_channel(mesh.address("messaging")) as msg,
    ):
        net = Net(
            mesh,
            pb_grpc.RegistryServiceStub(reg),
            ipb_grpc.IdentityServiceStub(reg),
            ppb_grpc.PolicyServiceStub(reg),
            mpb_grpc.MessagingServiceStub(msg),
        )
        for text in POLICIES:  # messages to "guarded" agents ask a person first
            await policy(net, text)
        member = await net.registry.CreateApiKey(
            pb.CreateApiKeyRequest(name=f"member-{secrets.token_hex(4)}", role=pb.ROLE_MEMBER), metadata=net.admin
        )
        yield ConsoleNet(net, member.token)


async def ask(net: Net) -> tuple[LocalAgent, str]:
    """A message to a "guarded" agent, held for a person's approval: the sender, and the pending approval's id."""
    alice = await local_agent(net)
    guarded = await local_agent(net, tags=["guarded"])
    await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(guarded, f"may I {secrets.token_hex(4)}")), metadata=alice.md
    )
    found: list[str] = []

    async def pending() -> None:
        listed = await net.policies.ListApprovals(
            ppb.ListApprovalsRequest(status="pending", page_size=500),
            metadata=net.admin,
        )
        mine = [a.id for a in listed.approvals if a.target_agent_id == guarded.id]
        assert mine, "no pending approval yet"
        found.append(mine[0])

    await eventually(pending, 10)
    return alice, found[-1]


async def dead_letter(net: Net) -> str:
    """A message its recipient dead-lettered at once (a nack with dead_letter): its id."""
    alice, bob = await local_agent(net), await local_agent(net)
    sent = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(bob, "poison")), metadata=alice.md
    )
    got: list[mpb.Delivery] = []

    async def delivered() -> None:
        answer = await net.messaging.ReceiveMessages(
            mpb.ReceiveMessagesRequest(max_messages=1, wait_seconds=1), metadata=bob.md
        )
        assert answer.deliveries
        got.extend(answer.deliveries)

    await eventually(delivered, 10)
    d = got[0]
    assert d.message.id == sent.message.id
    await net.messaging.NackMessage(
        mpb.NackMessageRequest(message_id=d.message.id, receipt=d.receipt, reason="cannot parse", dead_letter=True),
        metadata=bob.md,
    )
    return str(sent.message.id)


async def sign_in(session: aiohttp.ClientSession, base: str, credential: str) -> str:
    """Signs `session` in to the console; the CSRF token."""
    async with session.post(base + "/console/api/session", json={"credential": credential}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return str(body["csrf_token"])


CHROMIUM = "/usr/bin/chromium"
# The browser tests: skipped, saying why, where there is no Chromium.
browser_tests = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"console browser tests skipped: no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run does)",
)
# Expectations wait for the page as it updates (a live stream, an answer); generous for a loaded 2-core machine.
WAIT_MS = 15_000


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()  # its own cookies: each test signs in afresh
    opened = await context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda exc: problems.append(str(exc)))
    opened.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
    try:
        yield opened
    finally:
        await context.close()
    assert not problems, problems  # no script error, nothing the CSP had to block


async def sign_in_page(page: Page, console: ConsoleNet, credential: str, at: str = "#/overview") -> None:
    await page.goto(console.url("/console" + at))
    await page.fill("#credential", credential)
    await page.click("#sign-in button[type=submit]")
    await expect(page.locator("#who")).not_to_be_empty(timeout=WAIT_MS)
