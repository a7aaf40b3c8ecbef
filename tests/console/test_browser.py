"""The console in a real headless Chromium (Playwright) against a real mesh: sign-in, approvals, dead letters."""

from __future__ import annotations

import re

from playwright.async_api import Page, expect

from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.policy.v1 import policy_service_pb2 as ppb

from ..conftest import eventually
from .conftest import WAIT_MS, ConsoleNet, ask, browser_tests, dead_letter, sign_in_page

pytestmark = browser_tests


async def test_an_admin_signs_in_and_sees_the_overview(page: Page, console: ConsoleNet) -> None:
    await page.goto(console.url("/console"))
    await page.fill("#credential", "not-a-credential-of-this-mesh")
    await page.click("#sign-in button[type=submit]")
    await expect(page.locator("#sign-in-status")).to_contain_text("Sign-in refused", timeout=WAIT_MS)
    await sign_in_page(page, console, console.admin_token)
    await expect(page.locator("#who")).to_contain_text("(admin)")
    for tile in ("Agents", "Peers", "Pending approvals", "Dead letters"):
        value = page.locator(f'[data-tile="{tile}"] .tile-value')
        await expect(value).to_have_text(re.compile(r"^\d+\+?$|\d+ \w+"), timeout=WAIT_MS)


async def test_an_ask_arrives_live_and_is_approved(page: Page, console: ConsoleNet) -> None:
    await sign_in_page(page, console, console.admin_token, at="#/approvals")
    await expect(page.locator("#live")).to_have_attribute("data-live", "open", timeout=WAIT_MS)
    # Made after the page opened: it can only appear through the live stream.
    _, approval_id = await ask(console.net)
    row = page.locator(f'li.approval[data-id="{approval_id}"]')
    await expect(row).to_have_attribute("data-status", "pending", timeout=WAIT_MS)
    await expect(row.locator(".reasons")).to_contain_text("guarded agents answer only approved messages")
    await row.locator("button.approve").click()
    await expect(row).to_have_attribute("data-status", "approved", timeout=WAIT_MS)
    answered = await console.net.policies.GetApproval(
        ppb.GetApprovalRequest(id=approval_id), metadata=console.net.admin
    )
    assert answered.status == "approved"


async def test_a_dead_letter_is_replayed(page: Page, console: ConsoleNet) -> None:
    message_id = await dead_letter(console.net)
    await sign_in_page(page, console, console.admin_token, at="#/dead-letters")
    row = page.locator(f'#dead-letters tr[data-id="{message_id}"]')
    await expect(row).to_contain_text("cannot parse", timeout=WAIT_MS)
    await row.locator("button.replay").click()
    await expect(page.locator("#banner")).to_contain_text(f"Replayed {message_id}", timeout=WAIT_MS)
    await expect(row).to_have_count(0, timeout=WAIT_MS)

    async def replayed() -> None:
        m = await console.net.messaging.GetMessage(mpb.GetMessageRequest(id=message_id), metadata=console.net.admin)
        assert m.status != "dead_lettered", m.status

    await eventually(replayed, 10)


async def test_a_member_is_refused_an_admin_page_plainly(page: Page, console: ConsoleNet) -> None:
    await sign_in_page(page, console, console.member_token, at="#/dead-letters")
    await expect(page.locator("#who")).to_contain_text("(member)")
    refusal = page.locator("#page-dead-letters .error.refused")
    await expect(refusal).to_contain_text("Not allowed", timeout=WAIT_MS)
    # The words are the API's own: the console does not guess what a member may see, the API decides.
    await expect(refusal).to_contain_text("admin", timeout=WAIT_MS)
    # And what a member may see still works.
    await page.goto(console.url("/console#/agents"))
    await expect(page.locator("#agent-results")).not_to_contain_text("Searching", timeout=WAIT_MS)


async def test_agents_are_searched_and_shown_with_capabilities_and_card(page: Page, console: ConsoleNet) -> None:
    _, approval_id = await ask(console.net)  # registers a "guarded" agent among others
    approval = await console.net.policies.GetApproval(
        ppb.GetApprovalRequest(id=approval_id), metadata=console.net.admin
    )
    await sign_in_page(page, console, console.admin_token, at="#/agents")
    await page.fill('#agent-search input[name="tag"]', "guarded")
    await page.click("#agent-search button[type=submit]")
    link = page.locator(f'#agent-results a[href="#/agents/{approval.target_agent_id}"]')
    await link.click()
    await expect(page.locator("#agent-name")).to_have_text("messenger", timeout=WAIT_MS)
    await expect(page.locator("#agent-card")).to_contain_text('"name"', timeout=WAIT_MS)


async def test_what_would_happen_if_is_explained_by_the_policies(page: Page, console: ConsoleNet) -> None:
    await sign_in_page(page, console, console.admin_token, at="#/policies")
    await expect(page.locator("#policy-list")).to_contain_text("guarded agents answer only approved messages")
    await page.select_option('#explain select[name="caller_kind"]', "agent")
    await page.fill('#explain input[name="caller_id"]', "some-agent")
    await page.select_option('#explain select[name="action"]', "message.send")
    await page.fill('#explain input[name="agent_id"]', "another-agent")
    await page.fill('#explain input[name="tags"]', "guarded")
    await page.click("#explain button[type=submit]")
    await expect(page.locator("#explain-decision")).to_have_text("ask", timeout=WAIT_MS)
    await expect(page.locator("#explain-result")).to_contain_text("guarded agents answer only approved messages")
    # A question the API refuses is answered with its message, not a blank page.
    await page.fill('#explain input[name="caller_id"]', "x" * 5000)
    await page.click("#explain button[type=submit]")
    await expect(page.locator("#explain-result .error")).to_be_visible(timeout=WAIT_MS)
    await page.click('a[data-page="peers"]')
    await expect(page.locator("#peer-live")).to_have_attribute("data-live", "open", timeout=WAIT_MS)
