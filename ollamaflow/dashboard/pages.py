"""The dashboard's files, served under ``/dashboard/`` from the package (read once, at start).

They hold no data: the page asks for an admin token and reads everything through the admin
API, so serving them needs none. A strict Content-Security-Policy lets the page load nothing
but its own files and talk to nothing but this daemon.
"""

from __future__ import annotations

from importlib import resources

from twisted.web import server
from twisted.web.resource import Resource

PREFIX = b"/dashboard"
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}
_SECURITY = (
    (
        b"Content-Security-Policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; connect-src 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
)


def is_dashboard(path: bytes) -> bool:
    """Whether a (normalised) path is the dashboard's."""
    return path == PREFIX or path.startswith(PREFIX + b"/")


def packaged_files() -> dict[bytes, tuple[bytes, bytes]]:
    """``name → (content type, body)`` of every file in the package's ``static`` folder."""
    folder = resources.files("ollamaflow.dashboard") / "static"
    files: dict[bytes, tuple[bytes, bytes]] = {}
    for item in folder.iterdir():
        kind = _TYPES.get("." + item.name.rpartition(".")[2])
        if item.is_file() and kind is not None:
            files[item.name.encode()] = (kind, item.read_bytes())
    return files


class DashboardPages(Resource):
    """``GET /dashboard/`` and its files; ``/dashboard`` is redirected to ``/dashboard/``."""

    isLeaf = True

    def __init__(self, files: dict[bytes, tuple[bytes, bytes]] | None = None) -> None:
        super().__init__()
        self.files = packaged_files() if files is None else files

    def render_GET(self, request: server.Request) -> bytes:
        path = request.path
        if path == PREFIX:
            request.setResponseCode(308)
            request.setHeader(b"Location", PREFIX + b"/")
            return b""
        name = path[len(PREFIX) + 1 :] or b"index.html"
        found = self.files.get(name)
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"no such file in the dashboard"
        kind, body = found
        request.setHeader(b"Content-Type", kind)
        # Revalidated each time: a daemon upgraded under an open browser serves its own page.
        request.setHeader(b"Cache-Control", b"no-cache")
        for field, value in _SECURITY:
            request.setHeader(field, value)
        return body
