"""CORS in a real browser: Debian's Chromium, driven by Playwright, runs scripts of a page served
from another origin against a real daemon in front of a simulator. The page streams
``/api/chat`` (a preflight, then NDJSON lines read as they arrive) and lists ``/v1.0/backends``
with a bearer token (a preflight for ``Authorization``); an origin outside Ollama's defaults is
refused until the settings name it.

Playwright's sync API runs in a thread of its own (:func:`threads.deferToThread`): on the
reactor's thread it would block the daemon it talks to. Chromium must be installed
(``.ci/run`` installs it); without it these tests fail, they never skip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from harness import DaemonUnderTest, start_daemon
from listening import listen_local, port_number, stop_listening
from playwright.sync_api import Page, sync_playwright
from twisted.internet import threads
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ollamaflow.daemon import Daemon
from ollamaflow.server.interfaces import RequestHead

CHROMIUM = Path("/usr/bin/chromium")
#: A host name only the browser knows: its pages are an origin outside Ollama's defaults.
FAKE_HOST = "app.test"
FAST = {"HealthCheckIntervalMs": 100, "ModelRefreshIntervalMs": 1000}
PAGE = b"<!doctype html><title>an app</title><p>served from another origin</p>"

STREAM_CHAT = """
async ({flow}) => {
  const started = performance.now();
  const response = await fetch(flow + "/api/chat", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: "llama3", messages: [{role: "user", content: "hi"}]}),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const lines = [];
  let buffer = "", reads = 0;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    reads += 1;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n")) >= 0) {
      lines.push({at: performance.now() - started, line: JSON.parse(buffer.slice(0, end))});
      buffer = buffer.slice(end + 1);
    }
  }
  return {
    status: response.status,
    reads,
    lines,
    backend: response.headers.get("X-OllamaFlow-Backend"),
    request: response.headers.get("X-OllamaFlow-Request"),
  };
}
"""

LIST_BACKENDS = """
async ({flow, token}) => {
  try {
    const response = await fetch(flow + "/v1.0/backends", {
      headers: {"Authorization": "Bearer " + token},
    });
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {error: String(error)};
  }
}
"""

TAGS = """
async ({flow}) => {
  try {
    const headers = {"Content-Type": "application/json"};
    const response = await fetch(flow + "/api/tags", {headers});
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {error: String(error)};
  }
}
"""


class AppPage(Resource):
    """The app's page."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return PAGE


@attrs.frozen
class Pages:
    """A small site that serves :data:`PAGE`, on its own port: another origin than the daemon."""

    port: IListeningPort

    @property
    def number(self) -> int:
        return port_number(self.port)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.number}/"


def require_chromium() -> None:
    """Fail, never skip, without the browser."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; "
            ".ci/run does)",
            pytrace=False,
        )


@pytest_twisted.async_yield_fixture
async def pages() -> AsyncIterator[Pages]:
    require_chromium()  # before any daemon starts
    site = Site(AppPage())
    site.noisy = False
    port = listen_local(site)
    yield Pages(port)
    await stop_listening(port)


async def fleet_of(folder: Path, settings: dict[str, Any] | None = None) -> DaemonUnderTest:
    """A daemon in front of one simulator streaming 8 tokens at 40 a second."""
    folder.mkdir(exist_ok=True)
    fleet = DaemonUnderTest(await start_daemon(folder, {**FAST, **(settings or {})}))
    await fleet.add("sim", tokens=8, tokens_per_second=40)
    await fleet.serve("sim")
    return fleet


def in_browser(work: Callable[[Callable[[str], Page]], Any]) -> Any:
    """Run ``work`` in a thread with a headless Chromium: it opens pages with the function it
    is given; what it returns is the Deferred's result."""
    require_chromium()

    def run() -> Any:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[f"--host-resolver-rules=MAP {FAKE_HOST} 127.0.0.1", "--no-proxy-server"],
            )
            try:

                def open_page(url: str) -> Page:
                    page = browser.new_page()
                    page.set_default_timeout(10_000)
                    page.goto(url)
                    return page

                return work(open_page)
            finally:
                browser.close()

    return threads.deferToThread(run)


def count_options(daemon: Daemon) -> list[bytes]:
    """Record the path of every OPTIONS the daemon's front door answers (preflights
    included)."""
    seen: list[bytes] = []
    front_door = daemon.front_door
    original = front_door.cross_origin

    def recording(connection: Any, head: RequestHead) -> Any:
        if head.method == b"OPTIONS":
            seen.append(head.path)
        return original(connection, head)

    front_door.cross_origin = recording  # type: ignore[method-assign]
    return seen


@pytest_twisted.ensureDeferred
async def test_a_page_from_another_origin_streams_chat_and_lists_backends(
    tmp_path: Path, pages: Pages
) -> None:
    fleet = await fleet_of(tmp_path)
    try:
        options = count_options(fleet.daemon)
        token = fleet.http.token

        def work(open_page: Callable[[str], Page]) -> dict[str, Any]:
            page = open_page(pages.url())
            return {
                "origin": page.evaluate("location.origin"),
                "chat": page.evaluate(STREAM_CHAT, {"flow": fleet.url}),
                "backends": page.evaluate(LIST_BACKENDS, {"flow": fleet.url, "token": token}),
            }

        seen = await in_browser(work)
        assert seen["origin"] == f"http://127.0.0.1:{pages.number}" != fleet.url

        chat = seen["chat"]
        assert chat["status"] == 200
        lines = chat["lines"]
        assert [line["line"]["done"] for line in lines] == [False] * 8 + [True]
        assert "".join(line["line"]["message"]["content"] for line in lines[:-1])
        assert chat["reads"] >= 3, "the body was read as it came, not in one piece"
        assert lines[-1]["at"] - lines[0]["at"] > 0.1 * 1000 / 2, "lines arrived over time"
        assert chat["backend"] == "sim" and chat["request"], "exposed to the script"

        backends = seen["backends"]
        assert backends["status"] == 200
        assert "sim" in [b["Identifier"] for b in backends["body"]]
        assert options == [b"/api/chat", b"/v1.0/backends"], "one preflight each"
    finally:
        await fleet.stop()


@pytest_twisted.ensureDeferred
async def test_an_origin_outside_ollamas_defaults_is_refused_until_configured(
    tmp_path: Path, pages: Pages
) -> None:
    """``http://app.test:<port>``: refused for client traffic by default (Ollama's list) and
    allowed once ``Cors.AllowedOrigins`` names it; the admin API allows it by default (any
    origin, as 1.2) and refuses it once ``Cors.AdminAllowedOrigins`` names only others."""
    app_origin = f"http://{FAKE_HOST}:{pages.number}"
    default = await fleet_of(tmp_path / "default")
    configured = await fleet_of(
        tmp_path / "configured",
        {"Cors": {"AllowedOrigins": [app_origin], "AdminAllowedOrigins": ["https://ui.example"]}},
    )
    try:
        token = default.http.token

        def work(open_page: Callable[[str], Page]) -> dict[str, Any]:
            page = open_page(pages.url(FAKE_HOST))
            out: dict[str, Any] = {"origin": page.evaluate("location.origin")}
            for name, fleet in (("default", default), ("configured", configured)):
                args = {"flow": fleet.url, "token": token}
                out[name] = {
                    "tags": page.evaluate(TAGS, args),
                    "backends": page.evaluate(LIST_BACKENDS, args),
                }
            return out

        seen = await in_browser(work)
        assert seen["origin"] == app_origin
        for refused in (seen["default"]["tags"], seen["configured"]["backends"]):
            assert "Failed to fetch" in refused.get("error", ""), refused
        tags = seen["configured"]["tags"]
        assert tags["status"] == 200
        assert "llama3:latest" in [m["name"] for m in tags["body"]["models"]]
        backends = seen["default"]["backends"]
        assert backends["status"] == 200
        assert "sim" in [b["Identifier"] for b in backends["body"]]
    finally:
        await default.stop()
        await configured.stop()
