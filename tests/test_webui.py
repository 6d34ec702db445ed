"""The chat page (``GET /`` from a browser) in a real headless Chromium, driven by
Playwright, against real servers on the embedded SmolLM2 model (and Gemma 3 for the
model picker). Only the XSS test answers from a canned stream: it is about the page's
rendering, not the model.

The browser is the system's Chromium (``apt-get install chromium``; ``.ci/run``
installs it), or the one ``HEARTH_CHROMIUM`` names. Set ``HEARTH_SCREENSHOTS`` to a
folder to save the README's screenshots there."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from hearth.server import create_app  # noqa: E402
from test_server import _Server  # noqa: E402

LOAD = {"n_ctx": 1024, "parallel": 2}
TIMEOUT_MS = 90_000  # two shared CPUs: loads and answers can be slow


# -- the server's side, without a browser --------------------------------------------------


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[_Server]:
    with _Server(create_app([str(smollm2_path)], aliases=["small"], load_options=LOAD)) as s:
        yield s


def test_root_is_json_for_api_clients_and_the_page_for_browsers(server):
    for accept in (None, "*/*", "application/json"):
        r = httpx.get(f"{server.url}/", headers={"Accept": accept} if accept else {})
        assert r.json()["name"] == "hearth" and "Accept" in r.headers["vary"]
    r = httpx.get(f"{server.url}/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="ui/app.js"' in r.text and "<script>" not in r.text  # no inline script
    csp = r.headers["content-security-policy"]
    for rule in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'"):
        assert rule in csp
    assert "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert httpx.get(f"{server.url}/", headers={"Accept": "text/html;q=0, */*"}).json()["name"] == "hearth"


def test_the_page_files_are_served_from_the_package_and_nothing_else(server):
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"),
                       ("vendor/marked.umd.js", "text/javascript"), ("vendor/purify.min.js", "text/javascript")):
        r = httpx.get(f"{server.url}/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert r.headers["x-content-type-options"] == "nosniff"
    for name in ("__init__.py", "../app.py", "%2e%2e/app.py", "..%2fapp.py", "vendor/../__init__.py",
                 "/etc/passwd", "%2fetc%2fpasswd", "vendor/README.md", "nope.js"):
        assert httpx.get(f"{server.url}/ui/{name}").status_code == 404, name


def test_the_servers_own_origin_may_call_the_api_and_another_may_not(server):
    body = {"model": "small", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    own = ((f"127.0.0.1:{server.port}", server.url), (f"localhost:{server.port}", f"http://localhost:{server.port}"))
    for host, origin in own:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body,
                       headers={"Host": host, "Origin": origin, "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body,
                   headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403


def test_with_an_api_key_the_page_is_open_and_everything_else_is_not(smollm2_path):
    with _Server(create_app([], api_key="k")) as s:
        assert httpx.get(f"{s.url}/", headers={"Accept": "text/html"}).status_code == 200
        assert httpx.get(f"{s.url}/ui/app.js").status_code == 200
        assert httpx.get(f"{s.url}/").status_code == 401  # the JSON answer stays behind the key
        assert httpx.post(f"{s.url}/", headers={"Accept": "text/html"}).status_code == 401
        assert httpx.get(f"{s.url}/v1/models", headers={"Accept": "text/html"}).status_code == 401


# -- in the browser ----------------------------------------------------------------------------


def _chromium() -> str | None:
    if os.environ.get("HEARTH_CHROMIUM"):
        return os.environ["HEARTH_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    exe = _chromium()
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=args)
        except Exception as e:  # no system browser, and none of Playwright's own
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            pytest.skip(f"no Chromium to drive (apt-get install chromium, or set HEARTH_CHROMIUM): {first}")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh profile (empty localStorage) per test; a script error fails the test."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 720})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
    pg.errors = errors  # type: ignore[attr-defined]
    yield pg
    ctx.close()
    assert not errors, errors


def _open(page, url: str, model: str = "small") -> None:
    page.goto(url + "/")
    page.wait_for_function("m => document.querySelector('#model').value === m", arg=model)


def _settings(page, **values) -> None:
    page.click("#settings summary")
    for key, value in values.items():
        page.fill(f"#{key.replace('_', '-')}", str(value))
        page.dispatch_event(f"#{key.replace('_', '-')}", "change")
    page.click("#settings summary")


def _ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def _wait_answer(page, n: int = 1):
    """The n-th answer of this conversation, once it has its stats."""
    page.wait_for_selector(f".msg.assistant:nth-of-type({2 * n}) .stats[data-tps]")
    return page.locator(".msg.assistant").nth(n - 1)


def _shot(page, name: str) -> None:
    folder = os.environ.get("HEARTH_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


_SAMPLE_WHILE_STREAMING = """async () => {
  const seen = [], end = Date.now() + 90000;
  while (Date.now() < end) {
    const m = [...document.querySelectorAll('.msg.assistant')].pop();
    if (m && m.querySelector('.stats[data-tps]')) return seen;
    const n = m ? m.querySelector('.body').textContent.length : 0;
    if (n && seen[seen.length - 1] !== n) seen.push(n);
    await new Promise(r => setTimeout(r, 10));
  }
  return seen;
}"""


def test_an_answer_streams_in_and_shows_tokens_per_second_and_ttft(server, page):
    _open(page, server.url)
    assert page.locator("#model-state").get_attribute("data-state") == "ready"
    _settings(page, temperature=0, max_tokens=160)
    _ask(page, "Write a Python function that adds two numbers, in a code block.")
    seen = page.evaluate(_SAMPLE_WHILE_STREAMING)
    # the text grew piece by piece (Markdown may fold a few characters, a code fence's ```)
    assert len(seen) >= 3 and seen[-1] > seen[0], seen
    answer = _wait_answer(page)
    stats = answer.locator(".stats")
    assert re.search(r"\d+\.\d tok/s · ttft \d+(\.\d+)? (ms|s) · \d+ tokens · small", stats.inner_text())
    assert float(stats.get_attribute("data-tps")) > 0 and float(stats.get_attribute("data-ttft")) > 0
    assert answer.locator(".body").inner_text().strip()
    _shot(page, "webui-chat.png")


def _slots(url: str) -> list[dict]:
    return httpx.get(f"{url}/slots", timeout=10).json()


def test_stop_cancels_the_answer_on_the_server_and_frees_its_slot(server, page):
    _open(page, server.url)
    _settings(page, temperature=0, max_tokens=400)
    _ask(page, "Write a long essay about the history of Rome.")  # SmolLM2 runs to the limit on this one
    page.wait_for_function("() => (document.querySelector('.msg.assistant .body')?.textContent.length ?? 0) > 20")
    assert any(s["is_processing"] for s in _slots(server.url))  # mid-answer
    page.click("#stop")
    t0 = time.monotonic()
    while any(s["is_processing"] for s in _slots(server.url)):
        assert time.monotonic() - t0 < 3, "the slot is still generating 3 s after stop"
        time.sleep(0.05)
    last = max((s for s in _slots(server.url) if "id_task" in s), key=lambda s: s["id_task"])
    decoded = last["next_token"][0]["n_decoded"]
    assert decoded < 400  # cancelled, not run to its end
    answer = _wait_answer(page)
    stats = answer.locator(".stats").inner_text()
    assert "stopped" in stats and "(est.)" in stats
    assert 0 < int(re.search(r"(\d+) tokens", stats).group(1)) <= decoded
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    # the stopped answer stays in the conversation and the next one goes through
    _settings(page, max_tokens=8)
    _ask(page, "Hi")
    _wait_answer(page, 2)


def test_the_model_picker_loads_and_uses_the_picked_model(smollm2_path, gemma3_path, page):
    app = create_app([str(smollm2_path)], aliases=["small"], load_options=LOAD, models_dirs=[str(gemma3_path.parent)])
    gemma = gemma3_path.name
    with _Server(app) as s:
        _open(page, s.url)
        options = page.locator("#model option").all_inner_texts()
        assert "small ●" in options and gemma in options  # loaded models are marked
        sent: list[str] = []
        page.on("request", lambda r: sent.append(r.post_data_json["model"])
                if r.url.endswith("/v1/chat/completions") else None)
        page.evaluate("""() => { window.states = [];
            new MutationObserver(() => window.states.push(document.querySelector('#model-state').dataset.state))
              .observe(document.querySelector('#model-state'), {attributes: true}); }""")
        page.select_option("#model", gemma)
        page.wait_for_function("() => document.querySelector('#model-state').dataset.state === 'ready'")
        assert page.evaluate("window.states")[0] == "loading"
        assert f"{gemma} ●" in page.locator("#model option").all_inner_texts()
        assert gemma in [m["name"] for m in httpx.get(f"{s.url}/api/ps").json()["models"]]
        _settings(page, temperature=0, max_tokens=16)
        _ask(page, "Say hello.")
        assert _wait_answer(page).locator(".stats").inner_text().endswith(gemma)  # the response's model
        page.select_option("#model", "small")
        _ask(page, "Say hello.")
        assert _wait_answer(page, 2).locator(".stats").inner_text().endswith("small")
        assert sent == [gemma, "small"]


XSS = ('Here: <script>window.pwned=1</script> and <img src=x onerror="window.pwned=2"> '
       '[link](javascript:window.pwned=3)\n\n<iframe src="javascript:window.pwned=4"></iframe>\n\n'
       '```html\n<script>window.pwned=5</script>\n```\n')


def _sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_html_in_an_answer_is_shown_as_text_and_never_runs(server, page):
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "small"}
    pieces = [XSS[i:i + 7] for i in range(0, len(XSS), 7)]  # tags split across chunks, as tokens come
    body = _sse(*({**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces),
                {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                 "timings": {"prompt_n": 5, "prompt_ms": 5.0, "predicted_n": len(pieces), "predicted_ms": 50.0,
                             "predicted_per_second": 20 * len(pieces)}})
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    _open(page, server.url)
    _ask(page, "Say something dangerous.")
    answer = _wait_answer(page).locator(".body")

    def check() -> None:
        text = answer.inner_text()
        assert "<script>window.pwned=1</script>" in text and '<img src=x onerror="window.pwned=2">' in text
        assert "<script>window.pwned=5</script>" in answer.locator("pre code").inner_text()
        assert answer.locator("script, img, iframe").count() == 0
        assert answer.locator("a").count() == 1
        assert not (answer.locator("a").get_attribute("href") or "").startswith("javascript")
        answer.locator("a").click()  # a link with its script taken out does nothing
        assert page.evaluate("typeof window.pwned") == "undefined"

    check()
    page.reload()  # and rendered again from the stored conversation
    page.wait_for_selector(".msg.assistant .stats[data-tps]")
    answer = page.locator(".msg.assistant .body")
    check()


def test_the_page_asks_for_the_api_key_then_works(smollm2_path, page):
    with _Server(create_app([str(smollm2_path)], aliases=["small"], api_key="k", load_options=LOAD)) as s:
        page.goto(s.url + "/")
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        _shot(page, "webui-api-key.png")
        page.fill("#key", "wrong")
        page.click("#key-ok")
        page.wait_for_selector("#key-error", state="visible")  # asked again, saying why
        page.fill("#key", "k")
        page.click("#key-ok")
        page.wait_for_function("() => document.querySelector('#model').value === 'small'")
        assert not dialog.is_visible()
        _settings(page, max_tokens=8)
        _ask(page, "Hi")
        _wait_answer(page)
        page.reload()  # the key is remembered: not asked again
        page.wait_for_function("() => document.querySelector('#model').value === 'small'")
        assert not dialog.is_visible()


def test_conversations_survive_a_reload_and_can_be_deleted(server, page):
    _open(page, server.url)
    _settings(page, temperature=0, max_tokens=8)
    _ask(page, "Name a color.")
    first = _wait_answer(page).locator(".body").inner_text()
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    _ask(page, "Name an animal.")
    _wait_answer(page)
    page.reload()
    page.wait_for_selector(".msg.assistant .stats[data-tps]")
    titles = page.locator("#conversations .open").all_inner_texts()
    assert titles == ["Name an animal.", "Name a color."]
    assert page.locator(".msg.user").inner_text() == "Name an animal."  # the current one is reopened
    page.locator("#conversations .open", has_text="Name a color.").click()
    assert page.locator(".msg.assistant .body").inner_text() == first
    assert "tok/s" in page.locator(".msg.assistant .stats").inner_text()  # its stats were kept too
    page.locator("#conversations li", has_text="Name an animal.").locator(".delete").click()
    page.reload()
    page.wait_for_selector("#conversations li")
    assert page.locator("#conversations .open").all_inner_texts() == ["Name a color."]


def test_the_page_cannot_be_framed_by_another_origin(server, page):
    page.set_content(f'<iframe src="{server.url}/"></iframe>')
    time.sleep(1)
    frame = page.frames[1]
    assert frame.url != f"{server.url}/" or frame.evaluate("() => !document.querySelector('#composer')")
    page.errors.clear()  # Chromium reports the refusal on the console
