"""The console's peers, policies, messages and tools pages in a real headless Chromium against a real mesh."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, expect

from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.registry.v1 import registry_service_pb2 as pb

from ..conftest import eventually, unique_did
from ..messaging.conftest import local_agent, policy, text_message
from ..tools.conftest import McpServer, mcp_server  # noqa: F401 - the fixture: the SDK's MCP server on loopback
from .conftest import WAIT_MS, ConsoleNet, browser_tests, sign_in_page

pytestmark = browser_tests


class HealthyPeer:
    """A real HTTP server answering a REST peer's health endpoint, until it is stopped."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> HealthyPeer:
        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "healthy", "agent_count": 1})

        app = web.Application()
        app.router.add_get("/api/v1/health", health)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def peer_server() -> AsyncIterator[HealthyPeer]:
    server = await HealthyPeer().start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_peer_turns_unhealthy_live(page: Page, console: ConsoleNet, peer_server: HealthyPeer) -> None:
    admin = {"Authorization": f"Bearer {console.admin_token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            console.url("/api/v1/federation/peers"),
            headers=admin,
            json={
                "name": f"peer-{secrets.token_hex(3)}",
                "registry_url": f"http://127.0.0.1:{peer_server.port}",
                "api_key": "a-key-this-peer-issued",
            },
        ) as resp,
    ):
        body = await resp.json()
        assert resp.status == 200, body
        peer_id = body["id"]
    await sign_in_page(page, console, console.admin_token, at="#/peers")
    await expect(page.locator("#peer-live")).to_have_attribute("data-live", "open", timeout=WAIT_MS)
    status = page.locator(f'#peer-table tr[data-id="{peer_id}"] .peer-status .health')
    await expect(status).to_have_attribute("data-status", "healthy", timeout=WAIT_MS)
    charts = page.locator(f'.peer-charts[data-peer="{peer_id}"]')
    await expect(charts.locator("svg.chart-status rect.bar.status-healthy").first).to_be_attached(timeout=WAIT_MS)
    await expect(charts.locator("svg.chart-latency circle.dot").first).to_be_attached(timeout=WAIT_MS)

    # The last federated search's per-peer stats: this peer was asked (and cannot search: it only has /health).
    await page.click("#federated-search button[type=submit]")
    await expect(page.locator(f'#federation-stats tr[data-id="{peer_id}"]')).to_be_visible(timeout=WAIT_MS)

    # The server stops answering; the page hears it from the health monitor's watch stream, without a reload.
    await peer_server.stop()
    await expect(status).to_have_attribute("data-down", "true", timeout=WAIT_MS)
    assert await status.get_attribute("data-status") != "healthy"
    await expect(charts.locator("svg.chart-errors rect.bar.failure").first).to_be_attached(timeout=WAIT_MS)
    await expect(charts.locator("svg.chart-status rect.bar.status-unreachable").first).to_be_attached(timeout=WAIT_MS)


async def test_a_bad_policy_shows_the_error_by_the_field_and_a_good_one_saves(page: Page, console: ConsoleNet) -> None:
    name = f"console-{secrets.token_hex(4)}"
    await sign_in_page(page, console, console.admin_token, at="#/policies")
    await page.click("#new-policy")
    await page.fill("#policy-name", name)
    await page.uncheck("#policy-enabled")  # decides nothing for the other tests
    await page.fill("#policy-text", 'permit(principal, action == Action::"no.such.action", resource);')
    await page.click("#policy-form button[type=submit]")
    error = page.locator('#policy-form [data-error-for="policy.text"]')
    await expect(error).to_be_visible(timeout=WAIT_MS)
    await expect(error).not_to_be_empty()
    # Next to the field it is about.
    assert await page.locator("#policy-text + .field-error").count() == 1

    await page.fill(
        "#policy-text", '@reason("made in the console")\npermit(principal, action == Action::"agent.read", resource);'
    )
    await page.click("#policy-form button[type=submit]")
    status = page.locator("#policy-status")
    await expect(status).to_have_attribute("data-saved", re.compile(r"^[0-9a-f-]{36}$"), timeout=WAIT_MS)
    await expect(page.locator("#policy-form .field-error")).to_have_count(0)
    saved_id = await status.get_attribute("data-saved")
    saved = await console.net.policies.GetPolicy(ppb.GetPolicyRequest(id=saved_id), metadata=console.net.admin)
    assert saved.name == name and not saved.enabled and "made in the console" in saved.text

    # Edit: the list links to the form, which saves the change.
    await page.goto(console.url(f"/console#/policies/edit/{saved_id}"))
    await expect(page.locator("#policy-form")).to_have_attribute("data-mode", "edit", timeout=WAIT_MS)
    await page.fill("#policy-description", "edited in the console")
    await page.click("#policy-form button[type=submit]")
    await expect(status).to_contain_text("Saved", timeout=WAIT_MS)
    edited = await console.net.policies.GetPolicy(ppb.GetPolicyRequest(id=saved_id), metadata=console.net.admin)
    assert edited.description == "edited in the console"


async def test_a_conversation_thread_follows_each_message_status_live(page: Page, console: ConsoleNet) -> None:
    net = console.net
    alice, bob = await local_agent(net), await local_agent(net)
    conversation = f"conv-{secrets.token_hex(6)}"
    first = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(bob, "hello bob", conversation_id=conversation)), metadata=alice.md
    )
    await sign_in_page(page, console, console.admin_token, at=f"#/messages/{conversation}")
    await expect(page.locator("#thread-live")).to_have_attribute("data-live", "open", timeout=WAIT_MS)
    row = page.locator(f'#thread li.message[data-id="{first.message.id}"]')
    await expect(row).to_contain_text("hello bob", timeout=WAIT_MS)
    await expect(row).to_have_attribute("data-status", first.message.status, timeout=WAIT_MS)

    # A second message arrives in the thread live, and bob's receiving and acknowledging the first changes its status.
    second = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(bob, "and again", conversation_id=conversation)), metadata=alice.md
    )
    await expect(page.locator(f'#thread li.message[data-id="{second.message.id}"]')).to_be_attached(timeout=WAIT_MS)
    got: list[mpb.Delivery] = []

    async def received() -> None:
        answer = await net.messaging.ReceiveMessages(
            mpb.ReceiveMessagesRequest(max_messages=10, wait_seconds=1), metadata=bob.md
        )
        got.extend(answer.deliveries)
        assert any(d.message.id == first.message.id for d in got)

    await eventually(received, 10)
    delivery = next(d for d in got if d.message.id == first.message.id)
    await net.messaging.AckMessage(
        mpb.AckMessageRequest(message_id=delivery.message.id, receipt=delivery.receipt), metadata=bob.md
    )
    now = await net.messaging.GetMessage(mpb.GetMessageRequest(id=first.message.id), metadata=net.admin)
    assert now.status != first.message.status
    await expect(row).to_have_attribute("data-status", now.status, timeout=WAIT_MS)
    await expect(row).to_contain_text("hello bob")  # the content stays though the event carries none


async def test_a_tool_is_called_from_a_form_built_from_its_schema(
    page: Page,
    console: ConsoleNet,
    mcp_server: McpServer,  # noqa: F811 - the fixture imported above
) -> None:
    net = console.net
    agent = await net.registry.CreateAgent(
        pb.CreateAgentRequest(
            agent=pb.Agent(
                did=unique_did("mcp"),
                name=f"console tools {secrets.token_hex(3)}",
                version="1.0.0",
                endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_MCP, url=mcp_server.url)],
                auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token=mcp_server.token),
                sharing=pb.SHARING_LOCAL,
            )
        ),
        metadata=net.admin,
    )
    await policy(net, 'permit(principal, action == Action::"tool.list", resource);')
    await policy(
        net, f'permit(principal, action == Action::"tool.invoke", resource) when {{ resource.agent == "{agent.id}" }};'
    )

    async def catalogued() -> None:
        listed = await net.registry.GetAgent(pb.GetAgentRequest(id=agent.id), metadata=net.admin)
        assert {"slow", "add"} <= {c.name for c in listed.capabilities if c.kind == pb.CAPABILITY_KIND_TOOL}

    await eventually(catalogued, 30)
    await sign_in_page(page, console, console.admin_token, at="#/tools")
    await page.click(f'#page-tools a.try[href="#/tools/{agent.id}/slow"]', timeout=WAIT_MS)
    steps = page.locator('#tool-form input[name="steps"]')
    await expect(steps).to_have_attribute("data-kind", "integer", timeout=WAIT_MS)
    await steps.fill("3")
    await page.click("#tool-form button[type=submit]")
    await expect(page.locator("#tool-progress .progress-steps li")).to_have_count(3, timeout=WAIT_MS)
    await expect(page.locator("#tool-progress li").last).to_contain_text("step 3")
    await expect(page.locator("#tool-result")).to_contain_text("counted to 3", timeout=WAIT_MS)
    await expect(page.locator("#tool-result")).to_have_attribute("data-error", "false")

    # The API's validation of the arguments, by the field: "add" wants integers.
    await page.goto(console.url(f"/console#/tools/{agent.id}/add"))
    a = page.locator('#tool-form input[name="a"]')
    await expect(a).to_have_attribute("data-kind", "integer", timeout=WAIT_MS)
    await a.fill("2.5")
    await page.fill('#tool-form input[name="b"]', "40")
    await page.click("#tool-form button[type=submit]")
    await expect(page.locator('#tool-form [data-error-for="arguments/a"]')).to_be_visible(timeout=WAIT_MS)
    await a.fill("2")
    await page.click("#tool-form button[type=submit]")
    await expect(page.locator("#tool-result")).to_contain_text("42", timeout=WAIT_MS)


async def test_an_agents_detail_shows_its_health_history(
    browser: Browser, page: Page, console: ConsoleNet, peer_server: HealthyPeer
) -> None:
    net = console.net
    agent = await net.registry.CreateAgent(
        pb.CreateAgentRequest(
            agent=pb.Agent(
                did=unique_did("checked"),
                name="checked agent",
                version="1.0.0",
                health_check_url=f"http://127.0.0.1:{peer_server.port}/api/v1/health",
                sharing=pb.SHARING_LOCAL,
            )
        ),
        metadata=net.admin,
    )
    await sign_in_page(page, console, console.admin_token, at=f"#/agents/{agent.id}")
    await expect(page.locator("#agent-name")).to_have_text("checked agent", timeout=WAIT_MS)
    health = page.locator("#agent-health")
    # Drawn as the health monitor's checks come in (its first check is a change, sent on the watch stream).
    await expect(health.locator("svg.chart-status rect.bar.status-healthy").first).to_be_attached(timeout=WAIT_MS)
    await expect(health.locator(".summary .health")).to_have_attribute("data-status", "healthy")
    await peer_server.stop()
    await expect(health.locator(".summary .health")).not_to_have_attribute("data-status", "healthy", timeout=WAIT_MS)
    await expect(health.locator("svg.chart-errors rect.bar.failure").first).to_be_attached(timeout=WAIT_MS)

    # The history is the health monitor's, for admins: a member reads the API's refusal in that section only.
    member_context = await browser.new_context()
    try:
        member = await member_context.new_page()
        await sign_in_page(member, console, console.member_token, at=f"#/agents/{agent.id}")
        await expect(member.locator("#agent-name")).to_have_text("checked agent", timeout=WAIT_MS)
        await expect(member.locator("#page-agents .error.refused")).to_contain_text("Not allowed", timeout=WAIT_MS)
    finally:
        await member_context.close()
