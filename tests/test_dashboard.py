"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, signs in to a daemon
in front of two simulated boxes and uses every view as an operator would.

Playwright's sync API runs in a thread of its own (the reactor serves the daemon meanwhile);
what the test does to the fleet mid-way (stopping a box) it does on the reactor's thread through
:func:`on_reactor`. Every view is photographed at a laptop's 1366x768, into
``$OLLAMAFLOW_SCREENSHOTS`` when set (the README's pictures:
``OLLAMAFLOW_SCREENSHOTS=docs/screenshots pytest tests/test_dashboard.py``), else into the
test's temporary folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
import pytest_twisted
import treq
from completions import completed
from harness import DaemonUnderTest, Reply, start_daemon, until
from playwright.sync_api import Locator, Page, ViewportSize, expect, sync_playwright
from test_browser import CHROMIUM, require_chromium
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from ollamaflow.activity import BUCKET_SECONDS, BUCKETS, Activity
from ollamaflow.store.errors import BackendInUse

T = TypeVar("T")

#: Health checked every 100 ms: a stopped box shows within a second or two.
FAST = {"HealthCheckIntervalMs": 100, "ModelRefreshIntervalMs": 1000}
LAPTOP: ViewportSize = {"width": 1366, "height": 768}
#: How long the page may take to show what the daemon knows, in milliseconds.
SHOWN = 8_000
#: A model cell's pull bar as a fraction done, or null when it shows none.
FRACTION = (
    "c => { const b = c.querySelector('progress');"
    " return b && b.max > 0 ? b.value / b.max : null; }"
)


def on_reactor(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """From the browser's thread: run a coroutine on the reactor and wait for its result."""

    def start() -> Deferred[Any]:
        return Deferred.fromCoroutine(work())

    from_threads = cast(IReactorFromThreads, reactor)
    return cast(T, threads.blockingCallFromThread(from_threads, start))


@attrs.frozen
class Shots:
    """Where screenshots go."""

    folder: Path

    def take(self, page: Page, name: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(self.folder / f"{name}.png"))


def shots_folder(tmp_path: Path) -> Shots:
    chosen = os.environ.get("OLLAMAFLOW_SCREENSHOTS")
    return Shots(Path(chosen) if chosen else tmp_path / "screenshots")


@attrs.frozen
class Dashboard:
    """The fleet under test and where its dashboard is."""

    fleet: DaemonUnderTest
    shots: Shots

    @property
    def url(self) -> str:
        return self.fleet.url + "/dashboard/"

    @property
    def token(self) -> str:
        token = self.fleet.http.token
        assert token is not None
        return token


@pytest_twisted.async_yield_fixture
async def dashboard(tmp_path: Path) -> AsyncIterator[Dashboard]:
    require_chromium()
    fleet = DaemonUnderTest(await start_daemon(tmp_path, FAST))
    paced: dict[str, Any] = {"tokens": 24, "tokens_per_second": 80, "pull_time": 3.0}
    await fleet.add("gpu-1", backend={"Name": "GPU box 1"}, **paced)
    await fleet.add("gpu-2", models=("llama3",), backend={"Name": "GPU box 2"}, **paced)
    await fleet.serve("gpu-1", "gpu-2")
    # The box every new database starts with (localhost:11434): no fleet of ours has it.
    assert (await fleet.http.request("DELETE", "/v1.0/backends/backend1")).status == 204
    yield Dashboard(fleet, shots_folder(tmp_path))
    await fleet.stop()


def in_browser(work: Callable[[Page], T], *, dark: bool = False) -> Deferred[T]:
    """Run ``work`` with a fresh page of a headless Chromium at a laptop's size, in a thread."""

    def run() -> T:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
            try:
                page = browser.new_page(viewport=LAPTOP, color_scheme="dark" if dark else "light")
                page.set_default_timeout(SHOWN)
                return work(page)
            finally:
                browser.close()

    return threads.deferToThread(run)


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(url)
    page.fill("#token", token)
    page.click("#signin")
    expect(page.get_by_test_id("feed-status")).to_contain_text("live")


def tile(page: Page, backend: str) -> Any:
    return page.locator(f'[data-testid="backend-tile"][data-backend="{backend}"]')


def show(page: Page, view: str) -> None:
    page.click(f'button[data-view="{view}"]')
    expect(page.locator(f'button[data-view="{view}"]')).to_have_attribute("aria-current", "page")


async def chat(fleet: DaemonUnderTest, n: int = 1) -> None:
    """``n`` small chats through the daemon, each read to its end."""
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    for _ in range(n):
        response = await treq.post(fleet.url + "/api/chat", json=body, persistent=False)
        assert response.code == 200
        await response.content()


def past_traffic(activity: Activity, now: float) -> None:
    """Fifteen minutes of made-up traffic in the activity's buckets, so the charts of the
    screenshots have a shape (the live feed only shows whole buckets, which take 10 s)."""
    clock = activity.clock
    try:
        for bucket in range(BUCKETS):
            for backend, rate in (("gpu-1", 3), ("gpu-2", 2)):
                wave = 1 + (bucket // 6 + (backend == "gpu-2")) % 4
                for _ in range(rate * wave):
                    at = now - (BUCKETS - bucket) * BUCKET_SECONDS
                    activity.clock = lambda at=at: at  # type: ignore[misc]
                    activity(completed(backend=backend, eval_count=40 * wave, duration=0.8))
    finally:
        activity.clock = clock


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_told_clearly(dashboard: Dashboard) -> None:
    def work(page: Page) -> str:
        page.goto(dashboard.url)
        page.fill("#token", "not-the-token")
        page.click("#signin")
        error = page.get_by_test_id("signin-error")
        expect(error).to_be_visible()
        dashboard.shots.take(page, "sign-in-refused")
        return error.inner_text()

    message = await in_browser(work)
    assert "refused" in message and "401" in message


@pytest_twisted.ensureDeferred
async def test_two_healthy_boxes_show_and_one_stopped_turns_unhealthy(
    dashboard: Dashboard,
) -> None:
    fleet = dashboard.fleet
    past_traffic(fleet.daemon.activity, reactor.seconds())
    await chat(fleet, 4)

    def work(page: Page) -> dict[str, str]:
        sign_in(page, dashboard.url, dashboard.token)
        for backend in ("gpu-1", "gpu-2"):
            expect(tile(page, backend)).to_have_attribute("data-health", "healthy")
        expect(tile(page, "gpu-1")).to_contain_text("GPU box 1")
        dashboard.shots.take(page, "fleet")
        on_reactor(fleet.sims["gpu-2"].stop)
        # Health is checked every 100 ms and two failures make a box unhealthy: "a few
        # seconds" is the promise.
        expect(tile(page, "gpu-2")).to_have_attribute("data-health", "unhealthy", timeout=5_000)
        expect(tile(page, "gpu-1")).to_have_attribute("data-health", "healthy")
        dashboard.shots.take(page, "fleet-box-down")
        return {"why": tile(page, "gpu-2").get_by_test_id("backend-error").inner_text()}

    seen = await in_browser(work)
    assert seen["why"].strip(), "an unhealthy tile says why"


@pytest_twisted.ensureDeferred
async def test_a_pull_started_from_the_dashboard_advances_to_done(dashboard: Dashboard) -> None:
    def cell(page: Page, backend: str) -> Any:
        return page.locator(
            f'[data-testid="model-cell"][data-model="mistral:latest"][data-backend="{backend}"]'
        )

    def work(page: Page) -> list[float]:
        sign_in(page, dashboard.url, dashboard.token)
        show(page, "steer")
        form = page.get_by_test_id("pull-form")
        form.locator('select[name="Frontend"]').select_option("frontend1")
        form.locator('input[name="Model"]').fill("mistral")
        form.locator('input[name="Model"]').press("Enter")
        show(page, "models")
        expect(cell(page, "gpu-1")).to_have_attribute("data-state", "pulling")
        seen: list[float] = []
        photographed = False
        deadline = 20.0
        while cell(page, "gpu-1").get_attribute("data-state") == "pulling" and deadline > 0:
            # In one step in the page: the bar goes when the pull ends, between two reads.
            fraction = cell(page, "gpu-1").evaluate(FRACTION)
            if fraction is not None:
                seen.append(float(fraction))
                if 0.3 < seen[-1] < 0.8 and not photographed:
                    dashboard.shots.take(page, "models-pulling")
                    photographed = True
            page.wait_for_timeout(200)
            deadline -= 0.2
        for backend in ("gpu-1", "gpu-2"):
            expect(cell(page, backend)).to_have_attribute(
                "data-state", re.compile("present|loaded"), timeout=20_000
            )
        dashboard.shots.take(page, "models")
        return seen

    fractions = await in_browser(work)
    moving = [f for f in fractions if 0 < f < 1]
    assert len(set(moving)) >= 2, f"the bar moved: {fractions}"
    assert moving == sorted(moving), "and only forward"
    frontend = (await dashboard.fleet.http.get("/v1.0/frontends/frontend1")).json
    assert "mistral" in frontend["RequiredModels"]


@pytest_twisted.ensureDeferred
async def test_a_backend_made_through_the_form_reads_back_and_a_refusal_shows_why(
    dashboard: Dashboard,
) -> None:
    def work(page: Page) -> str:
        sign_in(page, dashboard.url, dashboard.token)
        show(page, "steer")
        form = page.get_by_test_id("backend-form")
        for name, value in {
            "Identifier": "gpu-3",
            "Name": "GPU box 3",
            "Hostname": "10.0.0.3",
            "Port": "11500",
            "MaxParallelRequests": "6",
            "Labels": "a100, spare",
        }.items():
            form.locator(f'[name="{name}"]').fill(value)
        form.locator('[type="submit"]').click()
        expect(
            page.locator('[data-testid="steer-backend-row"]').filter(has_text="gpu-3")
        ).to_be_visible()
        dashboard.shots.take(page, "steer")
        # The same identifier again: the admin API refuses it, the form says why.
        form.locator('[name="Identifier"]').fill("gpu-1")
        form.locator('[type="submit"]').click()
        error = form.get_by_test_id("form-error")
        expect(error).to_be_visible()
        return error.inner_text()

    refusal = await in_browser(work)
    assert "gpu-1" in refusal and "exists" in refusal
    made = await dashboard.fleet.http.get("/v1.0/backends/gpu-3")
    assert made.status == 200
    record = made.json
    assert (record["Name"], record["Hostname"], record["Port"]) == ("GPU box 3", "10.0.0.3", 11500)
    assert record["MaxParallelRequests"] == 6
    assert record["Labels"] == ["a100", "spare"]


@pytest_twisted.ensureDeferred
async def test_every_view_by_keyboard_with_live_requests_and_keys(dashboard: Dashboard) -> None:
    fleet = dashboard.fleet
    made = await fleet.http.request("POST", "/v1.0/apikeys", {"Name": "chat app"})
    assert made.status == 201
    await chat(fleet, 3)

    def work(page: Page) -> dict[str, Any]:
        sign_in(page, dashboard.url, dashboard.token)
        seen: dict[str, Any] = {}
        for view in ("frontends", "requests", "steer", "fleet"):
            button = page.locator(f'button[data-view="{view}"]')
            button.focus()
            page.keyboard.press("Enter")
            expect(button).to_have_attribute("aria-current", "page")
            if view == "requests":
                expect(page.get_by_test_id("request-row").first).to_be_visible()
                seen["requests"] = page.get_by_test_id("request-row").count()
                on_reactor(lambda: chat(fleet))
                expect(page.get_by_test_id("request-row")).to_have_count(seen["requests"] + 1)
            if view == "frontends":
                expect(page.get_by_test_id("frontend-row")).to_contain_text("frontend1")
            if view == "steer":
                expect(page.get_by_test_id("apikey-row")).to_contain_text("chat app")
            if view != "fleet":  # the fleet's picture is another test's
                dashboard.shots.take(page, view)
        return seen

    seen = await in_browser(work)
    assert seen["requests"] >= 3


@pytest_twisted.ensureDeferred
async def test_dark_mode_follows_the_system_and_the_toggle(dashboard: Dashboard) -> None:
    past_traffic(dashboard.fleet.daemon.activity, reactor.seconds())

    def work(page: Page) -> list[str | None]:
        sign_in(page, dashboard.url, dashboard.token)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        dashboard.shots.take(page, "fleet-dark")
        page.click("#theme-toggle")
        toggled = page.evaluate("getComputedStyle(document.body).backgroundColor")
        return [background, toggled, page.get_attribute("html", "data-theme")]

    dark, light, theme = await in_browser(work, dark=True)
    assert dark != light
    assert theme == "light"
    assert _luminance(dark) < _luminance(light)


def _luminance(css: str | None) -> float:
    assert css is not None
    red, green, blue = (int(n) for n in re.findall(r"\d+", css)[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


@pytest_twisted.ensureDeferred
async def test_names_from_the_network_show_as_text_never_as_markup(dashboard: Dashboard) -> None:
    """A backend's name is the admin's, a model's name the backend's, a path the client's:
    shown as text, never run; the CSP would stop a script anyway, this proves the page
    never makes one."""
    hostile = '<img src=x onerror="window.pwned=1"><b>box</b>'
    reply = await dashboard.fleet.http.put("/v1.0/backends/gpu-2", {"Name": hostile})
    assert reply.status == 200
    path = "/api/<script>window.pwned=2</script>"
    await treq.post(dashboard.fleet.url + path, json={}, persistent=False)

    def work(page: Page) -> dict[str, Any]:
        sign_in(page, dashboard.url, dashboard.token)
        expect(tile(page, "gpu-2")).to_contain_text(hostile)
        show(page, "requests")
        expect(page.get_by_test_id("request-row").first).to_contain_text(re.compile("script"))
        return {
            "pwned": page.evaluate("window.pwned === undefined ? null : window.pwned"),
            "images": page.locator("img").count(),
        }

    seen = await in_browser(work)
    assert seen == {"pwned": None, "images": 0}


# -- Steering the fleet from the page, checked through the admin API ---------------------------


def admin(fleet: DaemonUnderTest, method: str, path: str, body: Any = None) -> Reply:
    """From the browser's thread: one admin API call, made on the reactor."""
    return on_reactor(lambda: fleet.http.request(method, path, body))


def steer_row(page: Page, kind: str, identifier: str) -> Locator:
    """A row of a Steer list: ``kind`` backend, frontend or apikey."""
    testid, attribute = {
        "backend": ("steer-backend-row", "data-backend"),
        "frontend": ("steer-frontend-row", "data-frontend"),
        "apikey": ("apikey-row", "data-apikey"),
    }[kind]
    return page.locator(f'[data-testid="{testid}"][{attribute}="{identifier}"]')


def act(page: Page, kind: str, identifier: str, action: str) -> None:
    """Click one of a Steer row's buttons (edit, drain, putback, remove, usage, delete)."""
    steer_row(page, kind, identifier).locator(f'button[data-action="{action}"]').click()


async def chat_as(fleet: DaemonUnderTest, secret: str) -> int:
    """One small chat through the daemon with ``secret`` as the bearer; its status."""
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {secret}"}
    response = await treq.post(
        fleet.url + "/api/chat", json=body, headers=headers, persistent=False
    )
    await response.content()
    return cast(int, response.code)


def tab_until(page: Page, selector: str, presses: int = 40, *, back: bool = False) -> None:
    """Press Tab (Shift+Tab with ``back``) until the focused element matches ``selector``."""
    for pressed in range(presses + 1):
        if page.evaluate("s => document.activeElement?.matches(s) ?? false", selector):
            return
        if pressed < presses:
            page.keyboard.press("Shift+Tab" if back else "Tab")
    focused = page.evaluate("document.activeElement?.outerHTML.slice(0, 200)")
    raise AssertionError(f"{selector} not reached in {presses} presses; focus is on {focused}")


@pytest_twisted.ensureDeferred
async def test_a_backend_drained_from_steer_shows_draining_and_comes_back(
    dashboard: Dashboard,
) -> None:
    fleet = dashboard.fleet

    def work(page: Page) -> list[bool]:
        sign_in(page, dashboard.url, dashboard.token)
        expect(tile(page, "gpu-2")).to_have_attribute("data-health", "healthy")
        actives = []
        show(page, "steer")
        act(page, "backend", "gpu-2", "drain")
        form = page.get_by_test_id("backend-form")
        expect(form.get_by_test_id("form-result")).to_contain_text("gpu-2")
        expect(steer_row(page, "backend", "gpu-2").locator("[data-action=putback]")).to_be_visible()
        show(page, "fleet")
        expect(tile(page, "gpu-2")).to_have_attribute("data-health", "draining")
        expect(tile(page, "gpu-1")).to_have_attribute("data-health", "healthy")
        actives.append(admin(fleet, "GET", "/v1.0/backends/gpu-2").json["Active"])
        show(page, "steer")
        act(page, "backend", "gpu-2", "putback")
        expect(form.get_by_test_id("form-result")).to_contain_text("active again")
        show(page, "fleet")
        expect(tile(page, "gpu-2")).to_have_attribute("data-health", "healthy")
        actives.append(admin(fleet, "GET", "/v1.0/backends/gpu-2").json["Active"])
        return actives

    assert await in_browser(work) == [False, True]
    assert fleet.daemon.registry.catalog.backends["gpu-2"].active is True


@pytest_twisted.ensureDeferred
async def test_a_frontend_made_edited_and_removed_through_the_form(dashboard: Dashboard) -> None:
    fleet = dashboard.fleet

    def work(page: Page) -> list[Reply]:
        sign_in(page, dashboard.url, dashboard.token)
        show(page, "steer")
        form = page.get_by_test_id("frontend-form")
        result = form.get_by_test_id("form-result")
        form.locator('[name="Identifier"]').fill("fe-2")
        form.locator('[name="Hostname"]').fill("fe2.example")
        form.locator('input[name="Backends"][value="gpu-1"]').check()
        form.locator('[type="submit"]').click()
        expect(result).to_contain_text("Added frontend fe-2")
        expect(steer_row(page, "frontend", "fe-2")).to_contain_text("fe2.example")
        replies = [admin(fleet, "GET", "/v1.0/frontends/fe-2")]
        act(page, "frontend", "fe-2", "edit")
        expect(form).to_have_attribute("data-editing", "fe-2")
        expect(form.locator('input[name="Backends"][value="gpu-1"]')).to_be_checked()
        expect(form.locator('input[name="Backends"][value="gpu-2"]')).not_to_be_checked()
        form.locator('input[name="Backends"][value="gpu-2"]').check()
        form.locator('[type="submit"]').click()
        expect(result).to_contain_text("Saved frontend fe-2")
        expect(steer_row(page, "frontend", "fe-2")).to_contain_text("gpu-1, gpu-2")
        replies.append(admin(fleet, "GET", "/v1.0/frontends/fe-2"))
        act(page, "frontend", "fe-2", "remove")
        expect(result).to_contain_text("Removed frontend fe-2")
        expect(steer_row(page, "frontend", "fe-2")).to_have_count(0)
        return replies

    made, edited = await in_browser(work)
    assert made.status == 200, made.body
    assert (made.json["Hostname"], made.json["Backends"]) == ("fe2.example", ["gpu-1"])
    assert made.json["RequiredModels"] == []
    assert edited.status == 200, edited.body
    assert (edited.json["Hostname"], edited.json["Backends"]) == ("fe2.example", ["gpu-1", "gpu-2"])
    assert (await fleet.http.get("/v1.0/frontends/fe-2")).status == 404
    assert (await fleet.http.get("/v1.0/frontends/frontend1")).json["Backends"] == [
        "gpu-1",
        "gpu-2",
    ]


@pytest_twisted.ensureDeferred
async def test_removing_a_backend_in_use_says_why_and_forcing_takes_it_out(
    dashboard: Dashboard,
) -> None:
    fleet = dashboard.fleet
    refused = str(BackendInUse("gpu-2", ("frontend1",)))  # what the admin API's 409 describes

    def work(page: Page) -> None:
        sign_in(page, dashboard.url, dashboard.token)
        show(page, "steer")
        act(page, "backend", "gpu-2", "remove")
        error = page.get_by_test_id("backend-form").get_by_test_id("form-error")
        expect(error).to_contain_text(refused)
        assert admin(fleet, "GET", "/v1.0/backends/gpu-2").status == 200, "refused: still there"
        error.get_by_test_id("force-remove").click()
        expect(page.get_by_test_id("backend-form").get_by_test_id("form-result")).to_contain_text(
            "Removed backend gpu-2"
        )
        expect(steer_row(page, "backend", "gpu-2")).to_have_count(0)
        show(page, "fleet")
        expect(tile(page, "gpu-2")).to_have_count(0)

    await in_browser(work)
    assert (await fleet.http.get("/v1.0/backends/gpu-2")).status == 404
    assert (await fleet.http.get("/v1.0/frontends/frontend1")).json["Backends"] == ["gpu-1"]


@pytest_twisted.ensureDeferred
async def test_an_api_key_made_in_the_form_works_shows_its_usage_and_is_deleted(
    dashboard: Dashboard,
) -> None:
    fleet = dashboard.fleet

    async def used(identifier: str) -> int:
        """Waits for the admin API to count the key's request (at first from the daemon's
        memory), writes the counts to the store as the usage flusher does every
        ``RateLimits.UsageFlushIntervalMs``, and answers the count the API then reads."""
        path = f"/v1.0/apikeys/{identifier}/usage"

        async def requests() -> int:
            return cast(int, (await fleet.http.get(path)).json["Totals"]["Requests"])

        await until(requests, what="the key's request counted")
        await fleet.daemon.usage.flush()
        assert fleet.daemon.usage.pending_rows == 0
        return await requests()

    def work(page: Page) -> dict[str, Any]:
        sign_in(page, dashboard.url, dashboard.token)
        show(page, "steer")
        form = page.get_by_test_id("apikey-form")
        form.locator('[name="Name"]').fill("browser app")
        form.locator('[type="submit"]').click()
        expect(page.get_by_test_id("apikey-secret")).to_be_visible()
        secret = page.get_by_test_id("apikey-key").input_value()
        row = page.get_by_test_id("apikey-row").filter(has_text="browser app")
        expect(row).to_have_count(1)
        identifier = row.get_attribute("data-apikey")
        assert identifier
        seen: dict[str, Any] = {"secret": secret, "identifier": identifier}
        seen["record"] = admin(fleet, "GET", f"/v1.0/apikeys/{identifier}").json
        seen["chat"] = on_reactor(lambda: chat_as(fleet, secret))
        seen["used"] = on_reactor(lambda: used(identifier))
        act(page, "apikey", identifier, "usage")
        usage = page.get_by_test_id("apikey-usage")
        expect(usage.get_by_test_id("usage-row")).to_have_count(1)
        seen["usage"] = usage.get_by_test_id("usage-row").inner_text()
        act(page, "apikey", identifier, "delete")
        expect(form.get_by_test_id("form-result")).to_contain_text(f"Deleted key {identifier}")
        expect(page.get_by_test_id("apikey-secret")).to_be_hidden()  # its secret goes too
        expect(steer_row(page, "apikey", identifier)).to_have_count(0)
        expect(usage).to_be_hidden()
        return seen

    seen = await in_browser(work)
    secret, identifier = seen["secret"], seen["identifier"]
    assert secret.startswith("ofk_")
    assert seen["record"]["Name"] == "browser app"
    assert secret.startswith(seen["record"]["KeyPrefix"]) and "Key" not in seen["record"]
    assert seen["chat"] == 200, "the key works"
    assert seen["used"] == 1
    assert "llama3" in seen["usage"]
    assert (await fleet.http.get(f"/v1.0/apikeys/{identifier}")).status == 404
    assert await chat_as(fleet, secret) == 401, "a deleted key is refused"


@pytest_twisted.ensureDeferred
async def test_a_refused_frontend_edit_shows_the_fields_description(dashboard: Dashboard) -> None:
    fleet = dashboard.fleet
    before = (await fleet.http.get("/v1.0/frontends/frontend1")).json

    def work(page: Page) -> list[str]:
        sign_in(page, dashboard.url, dashboard.token)
        show(page, "steer")
        form = page.get_by_test_id("frontend-form")
        error = form.get_by_test_id("form-error")
        act(page, "frontend", "frontend1", "edit")
        expect(form).to_have_attribute("data-editing", "frontend1")
        refusals = []
        for name, value in (("MaxQueueDepth", "-1"), ("Hostname", "not a host!")):
            field = form.locator(f'[name="{name}"]')
            kept = field.input_value()
            field.fill(value)
            form.locator('[type="submit"]').click()
            expect(error).to_contain_text(name)
            refusals.append(error.inner_text())
            expect(form).to_have_attribute("data-editing", "frontend1")  # still editing
            field.fill(kept)
        return refusals

    depth, hostname = await in_browser(work)
    assert "-1" in depth
    assert "not a host!" in hostname
    after = (await fleet.http.get("/v1.0/frontends/frontend1")).json
    assert after == before, "nothing was changed"


@pytest_twisted.ensureDeferred
async def test_a_backend_added_with_the_keyboard_only(dashboard: Dashboard) -> None:
    fleet = dashboard.fleet

    def work(page: Page) -> None:
        page.goto(dashboard.url)
        tab_until(page, "#token")
        page.keyboard.type(dashboard.token)
        page.keyboard.press("Enter")
        expect(page.get_by_test_id("feed-status")).to_contain_text("live")
        tab_until(page, 'nav button[data-view="steer"]')
        page.keyboard.press("Enter")
        expect(page.locator('button[data-view="steer"]')).to_have_attribute("aria-current", "page")
        tab_until(page, '#backend-form [name="Identifier"]')
        page.keyboard.type("gpu-9")
        tab_until(page, '#backend-form [name="Name"]')
        page.keyboard.type("GPU box 9")
        tab_until(page, '#backend-form [name="Port"]')
        page.keyboard.type("11509")
        tab_until(page, '#backend-form [name="Hostname"]', back=True)
        page.keyboard.type("10.0.0.9")
        page.keyboard.press("Enter")
        expect(steer_row(page, "backend", "gpu-9")).to_be_visible()
        expect(page.get_by_test_id("backend-form").get_by_test_id("form-result")).to_contain_text(
            "Added backend gpu-9"
        )

    await in_browser(work)
    made = await fleet.http.get("/v1.0/backends/gpu-9")
    assert made.status == 200, made.body
    record = made.json
    assert (record["Name"], record["Hostname"], record["Port"]) == ("GPU box 9", "10.0.0.9", 11509)


@pytest_twisted.ensureDeferred
async def test_a_tile_shows_what_model_aware_placement_did_there(dashboard: Dashboard) -> None:
    fleet = dashboard.fleet
    reply = await fleet.http.put(
        "/v1.0/frontends/frontend1",
        {
            "Backends": ["gpu-1", "gpu-2"],
            "LoadBalancing": "ModelAware",
        },
    )
    assert reply.status == 200, reply.body
    body = {"model": "all-minilm", "input": "hello"}  # on gpu-1 only, and not loaded yet
    response = await treq.post(fleet.url + "/api/embed", json=body, persistent=False)
    assert response.code == 200
    await response.content()
    health = (await fleet.http.get("/v1.0/backends/gpu-1/health")).json
    assert health["Placement"]["Loads"] == 1

    def work(page: Page) -> str:
        sign_in(page, dashboard.url, dashboard.token)
        line = tile(page, "gpu-1").get_by_test_id("placement")
        expect(line).to_contain_text("1 loads")
        expect(tile(page, "gpu-2").get_by_test_id("placement")).to_have_count(0)
        return line.inner_text()

    assert "0 evicted" in await in_browser(work)
