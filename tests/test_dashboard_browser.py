"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
installs) driven by Playwright, against moonq running as real processes (the fake upstream,
the API and a worker). `MOONQ_SCREENSHOTS=1` writes the screenshots the README shows to
`docs/` (`make screenshots`)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI, chat
from tests.test_batches import jsonl, line

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

KEYS = "acme-browser-key-5e1=acme,beta-browser-key-9c4=beta"
ACME_KEY, BETA_KEY, ADMIN_KEY = "acme-browser-key-5e1", "beta-browser-key-9c4", "admin-key-77aa"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps reaching for Google's hosts.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FLAGS += ["--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if IN_CI:
            pytest.fail("CI=true but chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: docs/ when asked for, else the test's own folder."""
    if os.environ.get("MOONQ_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        return DOCS
    return tmp_path


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def submit(api: httpx.Client, key: str, payload: dict[str, Any]) -> str:
    response = api.post("/v1/jobs", json=payload, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def start_batch(api: httpx.Client, key: str, rows: list[Any]) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    upload = api.post(
        "/v1/files",
        files={"file": ("in.jsonl", jsonl(rows))},
        data={"purpose": "batch"},
        headers=auth,
    )
    assert upload.status_code == 200, upload.text
    payload = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"}
    created = api.post("/v1/batches", json=payload, headers=auth)
    assert created.status_code == 200, created.text
    batch_id: str = created.json()["id"]
    return batch_id


def text(page: Any, selector: str) -> str:
    found: str = page.locator(selector).first.inner_text()
    return found.strip()


def open_dashboard(browser: Any, url: str, key: str) -> tuple[Any, list[str]]:
    """A page logged in with `key`; the page's script errors are collected."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(f"{url}/dashboard")
    page.wait_for_selector("#login", state="visible")  # keys are set: it asks for one
    problems[:] = [p for p in problems if "401" not in p]  # the feed's answer before a key
    page.fill("#key", key)
    page.press("#key", "Enter")
    page.wait_for_selector("#login", state="hidden")
    wait(lambda: text(page, "#who"), 15, "the first snapshot")
    return page, problems


def test_a_tenant_watches_its_jobs_and_batch_live_and_cancels_it(
    cluster_factory: Any, browser: Any, shots: Path, request: pytest.FixtureRequest
) -> None:
    cluster = cluster_factory(limit=3, MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN_KEY)
    api = httpx.Client(base_url=cluster.api_url, timeout=10)
    request.addfinalizer(api.close)
    slow = submit(api, ACME_KEY, chat("a long story", fake_moonshot={"chunks": 60, "delay": 0.25}))
    quick = [submit(api, ACME_KEY, chat(f"quick {i}")) for i in range(3)]
    theirs = submit(api, BETA_KEY, chat("beta's own"))
    rows = [line(f"doc-{i}", fake_moonshot={"chunks": 4, "delay": 0.25}) for i in range(40)]
    batch = start_batch(api, ACME_KEY, rows)

    page, problems = open_dashboard(browser, cluster.api_url, ACME_KEY)
    assert text(page, "#who") == "tenant acme"
    page.wait_for_selector(f'#jobs tr[data-job="{slow}"]')
    for job_id in quick:
        page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]')
    # Another tenant's job is nowhere: not in the table, not in the page's text.
    assert page.locator(f'#jobs tr[data-job="{theirs}"]').count() == 0
    assert theirs not in page.content() and "beta" not in page.content()

    # A job's tokens appear as they stream (it streams for 15 s), then its result.
    page.click(f'#jobs tr[data-job="{slow}"]')
    page.wait_for_selector("#job", state="visible")
    output = page.locator("#job-output")
    seen = wait(lambda: len(output.inner_text()), 15, "the first tokens")
    wait(lambda: len(output.inner_text()) > seen, 10, "more tokens")
    assert text(page, "#job-status") == "in_progress"

    # The account's figures come and move.
    wait(lambda: text(page, "#workers") == "1", 15, "one worker alive")
    permits = wait(lambda: re.fullmatch(r"([1-3]) / 3", text(page, "#permits")), 15, "permits")
    assert int(permits[1]) >= 1
    assert text(page, "#queue-interactive") in ("—", "-", "")  # the account's load: admin only

    # The batch's progress bar fills as lines end.
    bar = page.locator(f'#batches tr[data-batch="{batch}"] [role="progressbar"]')
    assert bar.get_attribute("aria-valuemax") == "40"
    first = wait(lambda: int(bar.get_attribute("aria-valuenow") or 0), 20, "a line over")
    queued = text(page, "#mine-queued")
    row = f'#batches tr[data-batch="{batch}"]'
    page.evaluate("(row) => { window.batchRow = document.querySelector(row); }", row)
    wait(lambda: int(bar.get_attribute("aria-valuenow") or 0) > first, 20, "more lines over")
    # The row was updated in place, not rebuilt: a click on its Cancel is never lost.
    assert page.evaluate("(row) => document.querySelector(row) === window.batchRow", row)
    wait(lambda: text(page, "#mine-queued") != queued, 10, "fewer jobs queued")

    wait(lambda: text(page, "#job-status") == "completed", 30, "the job to complete")

    # The charts: hovering over the last step shows what ended in it.
    def last_step(chart: str) -> float | None:
        """The chart's first series at its last step, as its legend shows it on hover."""
        over = page.locator(f"#{chart} .u-over")
        box = over.bounding_box()
        over.hover(position={"x": box["width"] - 1, "y": box["height"] / 2})
        value = text(page, f"#{chart} .u-legend .u-series:nth-child(2) .u-value")
        return float(value.split()[0]) if value[:1].isdigit() else None  # "—": no job

    wait(lambda: (last_step("chart-jobs") or 0) > 0, 20, "jobs per second in the chart")
    wait(lambda: (last_step("chart-tokens") or 0) > 0, 10, "tokens per second in the chart")
    # The fake answers within milliseconds: a p50 is there, however small.
    wait(lambda: last_step("chart-ttft") is not None, 10, "time to first token in the chart")
    page.evaluate("window.scrollTo(0, 0)")
    page.mouse.move(0, 0)
    page.screenshot(path=str(shots / "dashboard-tenant.png"))
    result = api.get(f"/v1/jobs/{slow}", headers={"Authorization": f"Bearer {ACME_KEY}"}).json()
    assert output.inner_text() == result["result"]["choices"][0]["message"]["content"]
    assert str(result["usage"]["total_tokens"]) in text(page, "#job-result")

    # Cancel, from the page.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f'#batches tr[data-batch="{batch}"] button.cancel')
    auth = {"Authorization": f"Bearer {ACME_KEY}"}
    wait(
        lambda: api.get(f"/v1/batches/{batch}", headers=auth).json()["status"] == "cancelled",
        15,
        "the batch to be cancelled",
    )
    status = page.locator(f'#batches tr[data-batch="{batch}"] td.status')
    wait(lambda: status.inner_text().strip() == "cancelled", 10, "the row to say cancelled")
    assert page.locator(f'#batches tr[data-batch="{batch}"] button.cancel').count() == 0
    assert not problems, problems


def test_an_admin_sees_every_tenant_and_the_account(
    cluster_factory: Any, browser: Any, shots: Path, request: pytest.FixtureRequest
) -> None:
    env = {"MOONQ_API_KEYS": KEYS, "MOONQ_ADMIN_KEYS": ADMIN_KEY, "MOONQ_MAX_EVENTS": "100"}
    cluster = cluster_factory(limit=2, **env)
    api = httpx.Client(base_url=cluster.api_url, timeout=10)
    request.addfinalizer(api.close)
    long = submit(api, ACME_KEY, chat("long", fake_moonshot={"chunks": 300}))
    slow = {"fake_moonshot": {"chunks": 20, "delay": 0.2}}
    ours = [submit(api, ACME_KEY, chat(f"acme {i}", **slow)) for i in range(3)]
    theirs = [submit(api, BETA_KEY, chat(f"beta {i}", **slow)) for i in range(3)]
    failing = submit(api, BETA_KEY, chat("no", fake_moonshot={"error": "content_filter"}))
    flaky = {"error": "server_error", "fail_times": 1, "key": f"browser-{cluster.prefix}"}
    retried = submit(api, ACME_KEY, chat("again", fake_moonshot=flaky))
    rows = [line(f"doc-{i}", fake_moonshot={"chunks": 4, "delay": 0.2}) for i in range(10)]
    batch = start_batch(api, BETA_KEY, rows)

    page, problems = open_dashboard(browser, cluster.api_url, ADMIN_KEY)
    assert text(page, "#who") == "admin"
    for job_id in [*ours, *theirs]:
        page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]')
    tenant = page.locator(f'#jobs tr[data-job="{theirs[0]}"] td.tenant')
    assert tenant.inner_text().strip() == "beta"
    # The account-wide figures: jobs waiting behind the two permits, and in flight.
    wait(lambda: text(page, "#queue-interactive").isdigit(), 15, "the queue depth")
    wait(lambda: text(page, "#in-flight") not in ("", "—", "0"), 15, "jobs in flight")
    # Another tenant's batch, with its tenant; the admin may cancel it.
    batch_row = f'#batches tr[data-batch="{batch}"]'
    assert text(page, f"{batch_row} td.tenant") == "beta"
    assert page.locator(f"{batch_row} button.cancel").count() == 1
    page.screenshot(path=str(shots / "dashboard-admin.png"))

    # A retried job tells of each attempt, and why it ended.
    page.click(f'#jobs tr[data-job="{retried}"]')
    wait(lambda: text(page, "#job-status") == "completed", 20, "the retried job to complete")
    assert text(page, "#job-attempts") == "2"
    assert "Attempt 1: server_error" in text(page, "#job-history")

    # A job whose log was trimmed (MOONQ_MAX_EVENTS) shows its whole answer, and says so.
    page.click(f'#jobs tr[data-job="{long}"]')
    wait(lambda: text(page, "#job-status") == "completed", 20, "the long job to complete")
    result = api.get(f"/v1/jobs/{long}", headers={"Authorization": f"Bearer {ACME_KEY}"}).json()
    answer = result["result"]["choices"][0]["message"]["content"]
    wait(lambda: page.locator("#job-output").inner_text() == answer, 10, "the whole answer")
    assert "are no longer in the job's log" in text(page, "#job-note")

    # The status filter asks the feed for failed jobs only.
    page.select_option("#status-filter", "failed")
    wait(
        lambda: (
            page.locator("#jobs tbody tr[data-job]").count() == 1
            and page.locator(f'#jobs tr[data-job="{failing}"]').count() == 1
        ),
        20,
        "only the failed job",
    )
    assert text(page, f'#jobs tr[data-job="{failing}"] td.status') == "failed"
    page.click(f'#jobs tr[data-job="{failing}"]')
    wait(lambda: "content_filter" in text(page, "#job-error"), 10, "the job's error")

    # Signing out forgets the key.
    page.click("#logout")
    page.wait_for_selector("#login", state="visible")
    assert page.evaluate("sessionStorage.getItem('moonq-key')") is None
    assert not problems, problems


def test_an_open_api_with_admin_keys_takes_one_and_refuses_a_garbled_one(
    cluster_factory: Any, browser: Any
) -> None:
    cluster = cluster_factory(limit=2, MOONQ_ADMIN_KEYS=ADMIN_KEY)  # no tenant keys: open
    page = browser.new_page()
    page.goto(f"{cluster.api_url}/dashboard")
    wait(lambda: text(page, "#who") == "tenant default", 15, "the open, one-tenant view")
    assert text(page, "#in-flight") == "—"  # account-wide figures: an admin's only
    page.click("#use-key")
    page.fill("#key", ADMIN_KEY + "\u2019")  # a typographic quote came with the paste
    page.press("#key", "Enter")
    assert "printable ASCII" in text(page, "#login-error")
    assert page.locator("#login").is_visible()
    page.fill("#key", ADMIN_KEY)
    page.press("#key", "Enter")
    wait(lambda: text(page, "#who") == "admin", 15, "the admin's view")
    wait(lambda: text(page, "#in-flight").isdigit(), 15, "jobs in flight")
    assert page.locator("#use-key").is_hidden() and page.locator("#logout").is_visible()
