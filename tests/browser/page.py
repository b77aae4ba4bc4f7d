"""Drives hookrelay's delivery log page (/ui/) in headless Chromium, as a person would.

Run by the e2e test web_page:: (tests/e2e/web_page.rs) against an operator on the real API
server; hack/browser.sh installs what it needs. Exits 0 when every step passed; otherwise
raises with what was expected and writes the page as it was (failure.png) next to the
screenshots.

    tests/browser/.venv/bin/python tests/browser/page.py --base http://127.0.0.1:8080 \
        --token "$(kubectl create token viewer -n docs --audience hookrelay)" \
        --namespace docs --webhook failing --failed-delivery msg_... \
        --xss '<img src=x onerror=window.__xss=1>' --screenshots /tmp/shots
"""

import argparse
import json
import os
import re
import shutil
import sys
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

HERE = Path(__file__).resolve().parent
AXE = HERE / "node_modules" / "axe-core" / "axe.min.js"
TIMEOUT_MS = 30_000


def step(text):
    print(f"page.py: {text}", flush=True)


def chromium_path(given):
    path = given or os.environ.get("HOOKRELAY_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser"
    )
    if not path:
        sys.exit("page.py: no chromium found: run hack/browser.sh (or set HOOKRELAY_CHROMIUM)")
    return path


def axe_scan(page, where):
    """Runs axe-core in the page; fails on serious or critical violations."""
    # Evaluated through the DevTools protocol, which the page's CSP (script-src 'self') does not
    # govern: the page keeps its real policy during the scan.
    page.evaluate(AXE.read_text(encoding="utf-8") + "\n;undefined")
    result = page.evaluate(
        "async () => { const r = await axe.run(document, {resultTypes: ['violations']});"
        " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)})); }"
    )
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    for v in result:
        step(f"axe ({where}): {v['impact']} {v['id']}: {v['help']} at {v['nodes']}")
    assert not bad, f"axe-core found serious/critical violations on {where}: {json.dumps(bad, indent=1)}"
    step(f"axe ({where}): no serious or critical violation ({len(result)} minor)")


def api_get(base, token, path):
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def run(args, page, shots):
    csp_violations = []
    page.on(
        "console",
        lambda m: csp_violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)

    step("open the page: without a token it asks for one")
    page.goto(f"{args.base}/ui/")
    expect(page.locator("[data-state=empty]")).to_be_visible()
    page.get_by_label("Bearer token").fill(args.token)
    page.get_by_role("button", name="Use this token").click()

    step("pick the namespace")
    namespace = page.locator("#namespace")
    if namespace.evaluate("e => e.tagName") == "SELECT":
        namespace.select_option(args.namespace)
    else:
        namespace.fill(args.namespace)
    page.get_by_role("button", name="Show Webhooks").click()

    step("the Webhooks list shows the Webhook created with kubectl")
    row = page.locator(f'tr[data-webhook="{args.webhook}"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text("Ready")
    # The delivery history's summary: the only event failed, so nothing succeeded yet.
    expect(row.locator("td").nth(5)).not_to_have_text("—")
    expect(row.locator("td").nth(6)).to_have_text("0 %")
    expect(row.locator("td").nth(7)).to_have_text("0")
    page.screenshot(path=str(shots / "webhooks-list.png"), full_page=True)
    axe_scan(page, "Webhooks list")

    step("open the Webhook page with the keyboard")
    link = row.get_by_role("link", name=args.webhook)
    link.focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Webhook {args.webhook}")
    # Marks this document: it must survive every step below (no reload).
    page.evaluate("window.__sameDocument = true")

    step("the failed delivery is listed; the receiver's HTML is shown as text and never runs")
    failed = page.locator(f'tr[data-delivery-id="{args.failed_delivery}"]')
    expect(failed).to_be_visible()
    expect(failed).to_contain_text("Failed")
    if args.xss:
        # The receiver's refusal, recorded as the attempt's error, is shown as it was written.
        expect(failed.locator(".error-text")).to_contain_text(args.xss)
        assert page.locator("main img").count() == 0, "an <img> from API text was created"
    assert page.evaluate("typeof window.__xss") == "undefined", "the injected onerror ran"

    step("send a test delivery: it appears without reloading")
    page.get_by_role("button", name="Send a test delivery").click()
    result = page.locator("#action-result")
    expect(result).to_contain_text("Test delivery msg_test_")
    test_id = re.search(r"msg_test_[0-9a-f]+", result.inner_text()).group(0)
    expect(page.locator(f'tr[data-delivery-id="{test_id}"]')).to_be_visible()

    step("redeliver the failed delivery")
    failed.get_by_role("button", name=f"Redeliver {args.failed_delivery}").click()
    expect(result).to_contain_text(f"Redelivery of {args.failed_delivery}")
    expect(page.locator(f'tr[data-delivery-id="{args.failed_delivery}"] >> nth=0')).to_be_visible()

    step("pause, then resume")
    pause = page.locator("#pause")
    pause.click()
    expect(pause).to_have_attribute("aria-pressed", "true")
    expect(result).to_contain_text("Paused")
    assert api_get(args.base, args.token, f"/api/webhooks/{args.webhook}?namespace={args.namespace}")[
        "paused"
    ], "the API does not show the Webhook paused"
    pause.click()
    expect(pause).to_have_attribute("aria-pressed", "false")
    expect(result).to_contain_text("Resumed")
    # The poll brings the controller's verdict: Ready again (not "Paused"), without a reload.
    expect(page.locator("#webhook-facts .badge-ok", has_text="Ready")).to_be_visible()

    step("search by delivery id")
    page.get_by_label("Search by").select_option("delivery_id")
    page.get_by_label("Value to search for").fill(args.failed_delivery)
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.get_by_role("region", name="Search results")).to_be_visible()
    page.get_by_role("button", name="Show recent deliveries").click()
    expect(page.get_by_role("region", name="Recent deliveries")).to_be_visible()

    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    assert page.evaluate("typeof window.__xss") == "undefined", "the injected onerror ran"
    page.screenshot(path=str(shots / "webhook-page.png"), full_page=True)
    axe_scan(page, "Webhook page")

    step("at a phone's width nothing overflows the page sideways")
    page.set_viewport_size({"width": 375, "height": 800})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the page is {overflow}px wider than a 375px screen"
    page.screenshot(path=str(shots / "webhook-page-375px.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})

    step("a delivery row links to its event's page; Back returns")
    # The event's own row (a redelivery's row has source "redeliver", no event name).
    page.locator(f'tr[data-delivery-id="{args.failed_delivery}"] a').first.click()
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile(r"^Event "))
    # Its phase, and its delivery to this Webhook (failed: the receiver refuses everything).
    expect(page.locator("main .facts")).to_contain_text("Failed")
    target = page.locator("main tr", has=page.get_by_role("link", name=args.webhook, exact=True))
    expect(target).to_contain_text("Failed")
    if args.xss:
        expect(target).to_contain_text(args.xss)
    page.go_back()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Webhook {args.webhook}")
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"

    step("a wrong token shows the unauthorised state")
    page.goto(f"{args.base}/ui/#/")
    page.get_by_label("Bearer token").fill("not-a-valid-token")
    page.get_by_role("button", name="Use this token").click()
    page.goto(f"{args.base}/ui/#/ns/{args.namespace}")
    unauthorized = page.locator("[data-state=unauthorized]")
    expect(unauthorized).to_be_visible()
    expect(unauthorized).to_contain_text("Your token was not accepted")
    expect(unauthorized.get_by_label("Bearer token")).to_be_visible()
    page.screenshot(path=str(shots / "unauthorized.png"), full_page=True)
    axe_scan(page, "unauthorised state")

    if args.readonly_token:
        step("a read-only token sees the Webhook; its test delivery is forbidden, naming the verb")
        page.goto(f"{args.base}/ui/#/")
        page.get_by_label("Bearer token").fill(args.readonly_token)
        page.get_by_role("button", name="Use this token").click()
        page.goto(f"{args.base}/ui/#/ns/{args.namespace}/webhooks/{args.webhook}")
        expect(page.locator(f'tr[data-delivery-id="{args.failed_delivery}"] >> nth=0')).to_be_visible()
        page.get_by_role("button", name="Send a test delivery").click()
        forbidden = page.locator("#action-result [data-state=forbidden]")
        expect(forbidden).to_be_visible()
        expect(forbidden).to_contain_text("may not test webhooks.hookrelay.dev")
        page.screenshot(path=str(shots / "forbidden.png"), full_page=True)
        axe_scan(page, "forbidden state")

    assert not csp_violations, f"the page broke its own Content-Security-Policy: {csp_violations}"
    step("every step passed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the operator's API address, http://host:port")
    parser.add_argument("--token", required=True, help="a bearer token hookrelay accepts")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--webhook", required=True, help="a Webhook of the namespace")
    parser.add_argument("--failed-delivery", required=True, help="a failed delivery of a DocumentEvent to it")
    parser.add_argument("--readonly-token", default="", help="a token allowed get/list only (403 on actions)")
    parser.add_argument("--xss", default="", help="text from the API that must be shown as text")
    parser.add_argument("--screenshots", required=True, help="directory for the PNG files")
    parser.add_argument("--chromium", default="", help="the browser binary (default: chromium on PATH)")
    args = parser.parse_args()
    args.base = args.base.rstrip("/")
    shots = Path(args.screenshots)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(args.chromium),
            headless=True,
            # As root (CI) chromium's sandbox cannot start.
            args=["--no-sandbox"],
        )
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        try:
            run(args, page, shots)
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


if __name__ == "__main__":
    main()
