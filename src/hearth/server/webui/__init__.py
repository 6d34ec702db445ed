"""The chat page: ``GET /`` for a browser, its files under ``/ui/``.

Static files shipped in this folder, no build step and nothing fetched from elsewhere
at run time (``marked`` and ``DOMPurify`` are vendored, see ``vendor/README.md``).
Only the files found here at import are served, by exact name, so no path reaches
outside. Every answer carries a Content-Security-Policy that allows scripts, styles,
images and fetches from this server only (no inline script) and no framing; the
page and its files need no API key (they hold no data), the API behind them does.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException

HERE = Path(__file__).parent
PREFIX = "/ui/"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
FILES: dict[str, Path] = {p.relative_to(HERE).as_posix(): p for p in sorted(HERE.rglob("*"))
                          if p.suffix in _TYPES and p.is_file()}


def wants_html(accept: str | None) -> bool:
    """A browser navigating asks for text/html; curl (``*/*``), API clients and
    Ollama-style probes do not, and keep getting JSON."""
    for part in (accept or "").lower().split(","):
        kind, *params = (x.strip() for x in part.split(";"))
        if kind == "text/html":
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def is_page(method: str, path: str, accept: str | None) -> bool:
    """A request for the page or one of its files (served without the API key)."""
    return method in ("GET", "HEAD") and (path.startswith(PREFIX) or (path == "/" and wants_html(accept)))


def page() -> Response:
    return FileResponse(HERE / "index.html", media_type=_TYPES[".html"], headers={**HEADERS, "Vary": "Accept"})


router = APIRouter()


@router.get(PREFIX + "{name:path}", include_in_schema=False)
async def static_file(name: str) -> Response:
    path = FILES.get(name)
    if path is None:
        raise HTTPException(404, f"no file {PREFIX}{name}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=HEADERS)
