"""Attacks and accidents against the real server: schemas and grammars that used to kill
it, web pages from other origins and rebound DNS names, paths to the owner's files,
slow and half-sent requests, malformed values that used to be 500s, a daemon that
does not answer, a model file truncated under a loaded model.

The server runs as a separate process (``hearth serve``) wherever a crash must show
as a failed test rather than take pytest down with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_server import _Server  # noqa: E402

from hearth.server import create_app  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m hearth serve`` in its own process group."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = {k: v for k, v in os.environ.items() if not k.startswith(("HEARTH_", "OLLAMA_"))}
        e.update(HEARTH_HOME=str(root / "home"), HEARTH_CONFIG=str(root / "absent.toml"),
                 OLLAMA_MODELS=str(root / "ollama"), HF_HUB_CACHE=str(root / "hf"),
                 HF_ENDPOINT="http://127.0.0.1:9", **(env or {}))
        self.log = open(root / f"serve-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "hearth", "serve", "--port", str(self.port), *args],
                                     env=e, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> ServeProcess:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"hearth serve exited {self.proc.returncode}: {self.tail()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"hearth serve did not come up: {self.tail()}")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        return httpx.get(f"{self.url}/health", timeout=30).status_code == 200

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-3000:].decode(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def served(root: Path, smollm2_path: Path) -> Iterator[ServeProcess]:
    models = root / "models"
    models.mkdir(exist_ok=True)
    shutil.copyfile(smollm2_path, models / "tiny.gguf")
    with ServeProcess(root, "--model", "smollm2", "--n-ctx", "512", "--parallel", "2",
                      "--models-dir", str(models)) as s:
        yield s


def _gen(url: str, fmt: object, **opts: object) -> httpx.Response:
    return httpx.post(f"{url}/api/generate", json={"model": "smollm2", "prompt": "Give me JSON.", "stream": False,
                                                   "format": fmt, "options": {"num_predict": 8, **opts}},
                      timeout=120)


# -- 1. schemas and grammars -------------------------------------------------------------


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 20000},
    {"type": "string", "maxLength": 200000},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 200000},
    {"type": "object", "properties": {"path": {"type": "string", "maxLength": 65536}}, "required": ["path"]},
], ids=["maxLength-20000", "maxLength-200000", "maxItems-200000", "agent-tool-65536"])
def test_schemas_with_huge_bounds_are_served_not_fatal(served: ServeProcess, schema: dict):
    r = _gen(served.url, schema)
    assert r.status_code == 200, r.text
    body = httpx.post(f"{served.url}/v1/chat/completions", json={
        "model": "smollm2", "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, timeout=120)
    assert body.status_code == 200, body.text
    assert served.alive()


@pytest.mark.parametrize("grammar,limit", [
    ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "nests"),
    ('root ::= "a"{0,100000}', "repeats"),
    ("\n".join(f'r{i} ::= "a"' for i in range(12000)) + "\nroot ::= r0", "rules"),
    ("root ::= " + '"a" ' * 200000, "bytes"),
])
def test_costly_grammars_get_a_400_that_names_the_limit(served: ServeProcess, grammar: str, limit: str):
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 4,
                                                          "grammar": grammar}, timeout=120)
    assert r.status_code in (400, 413), r.text
    if r.status_code == 400:
        assert limit in r.json()["error"]["message"]
    assert served.alive()


def test_large_lower_bounds_are_refused_with_the_reason(served: ServeProcess):
    r = _gen(served.url, {"type": "string", "minLength": 20000})
    assert r.status_code == 400 and "minLength" in r.json()["error"]


_KEYS = st.sampled_from(["type", "properties", "items", "maxLength", "minLength", "maxItems", "minItems",
                         "enum", "anyOf", "oneOf", "allOf", "pattern", "required", "const", "format",
                         "additionalProperties", "$ref", "$defs", "minimum", "maximum", "prefixItems"])
_LEAVES = st.one_of(st.integers(-5, 300000), st.sampled_from(["string", "object", "array", "integer", "number",
                                                               "boolean", "null", "#/$defs/a", "#", "^a{1,9}$",
                                                               "date-time", "uuid", ".*", "[a-z]+{3}"]),
                    st.booleans(), st.none(), st.text(max_size=8))
_SCHEMAS = st.recursive(_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.one_of(_KEYS, st.text(max_size=5)),
                                                                         inner, max_size=5)), max_leaves=25)
_GBNF = st.lists(st.sampled_from(['root', ' ::= ', '"a"', '[a-z]', '(', ')', '|', '*', '+', '?', '{0,9}',
                                  '{99999}', '\n', 'x', ' ::= x', '# c\n', '"\\', '[^', '{', '}', '{1,}', '\\u0000',
                                  'root ::= ', '"b"*']), max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(schema=_SCHEMAS, grammar=_GBNF)
def test_fuzzed_schemas_and_grammars_never_take_the_server_down(served: ServeProcess, schema, grammar):
    r = _gen(served.url, schema if isinstance(schema, dict) else {"type": "object", "x": schema})
    assert r.status_code in (200, 400), r.text
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 2,
                                                          "grammar": grammar}, timeout=120)
    assert r.status_code in (200, 400), r.text
    assert served.proc.poll() is None, served.tail()


# -- 3. other web pages, rebound names -----------------------------------------------------


def test_a_cross_site_text_plain_post_is_refused_and_runs_nothing(served: ServeProcess):
    body = json.dumps({"model": "smollm2", "prompt": "hi", "stream": False}).encode()
    r = httpx.post(f"{served.url}/api/generate", content=body, timeout=30,
                   headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403 and "origin" in r.json()["error"]
    r = httpx.post(f"{served.url}/api/pull", content=b'{"model": "qwen2.5:0.5b"}', timeout=30,
                   headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403
    # no Origin, but a type a form can send: refused too (only JSON, or curl's untyped -d)
    r = httpx.post(f"{served.url}/api/generate", content=body, headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415
    r = httpx.post(f"{served.url}/api/generate", content=body, timeout=60,
                   headers={"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 415
    # curl -d (form type, no Origin, not from a browser) keeps working, as with Ollama
    r = httpx.post(f"{served.url}/api/generate", timeout=60, content=json.dumps(
        {"model": "smollm2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


def test_a_rebound_host_name_is_refused(served: ServeProcess):
    for method, path in (("GET", "/api/tags"), ("DELETE", "/api/delete"), ("POST", "/api/generate")):
        r = httpx.request(method, f"{served.url}{path}", headers={"Host": f"attacker.example:{served.port}"},
                          json={"model": "smollm2"}, timeout=30)
        assert r.status_code == 403 and "Host" in r.text, (path, r.text)
    for ok in (f"localhost:{served.port}", f"127.0.0.1:{served.port}", f"app.localhost:{served.port}"):
        assert httpx.get(f"{served.url}/api/version", headers={"Host": ok}, timeout=30).status_code == 200


def test_cors_preflight_and_headers_for_allowed_origins_only(served: ServeProcess):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
    r = httpx.options(f"{served.url}/v1/chat/completions", headers={"Origin": "http://localhost:3000", **pre})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"]
    r = httpx.options(f"{served.url}/v1/chat/completions", headers={"Origin": "https://evil.example", **pre})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{served.url}/v1/models", headers={"Origin": "http://127.0.0.1:8080"}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"


def test_hearth_origins_adds_origins(root: Path, smollm2_path: Path):
    with ServeProcess(root, "--n-ctx", "256", env={"HEARTH_ORIGINS": "https://chat.example,https://*.corp.example"}) as s:
        for origin, status in (("https://chat.example", 200), ("https://a.corp.example", 200),
                               ("https://evil.example", 403)):
            assert httpx.get(f"{s.url}/api/version", headers={"Origin": origin}, timeout=30).status_code == status


def test_a_server_bound_to_all_interfaces_answers_any_host(root: Path):
    with ServeProcess(root, "--host", "0.0.0.0", "--n-ctx", "256") as s:
        r = httpx.get(f"{s.url}/api/version", headers={"Host": "my-box.lan:1234"}, timeout=30)
        assert r.status_code == 200


# -- 4. the owner's files ------------------------------------------------------------------


def test_http_clients_cannot_probe_or_load_the_owners_files(served: ServeProcess, root: Path, smollm2_path: Path):
    secret = root / "secret.gguf"
    shutil.copyfile(smollm2_path, secret)  # a readable GGUF outside --models-dir
    models = root / "models"
    (models / "passwd.gguf").unlink(missing_ok=True)
    (models / "passwd.gguf").symlink_to("/etc/passwd")
    if not (models / "fifo.gguf").exists():
        os.mkfifo(models / "fifo.gguf")
    (models / "escape.gguf").unlink(missing_ok=True)
    (models / "escape.gguf").symlink_to(secret)
    answers = {}
    for name in (str(secret), "/nonexistent/x.gguf", "/etc/passwd", str(root), str(models / "passwd.gguf"),
                 "passwd.gguf", str(models / "fifo.gguf"), "fifo.gguf", "escape.gguf",
                 f"{models}/../secret.gguf", f"/proc/self/root{secret}", "../secret.gguf"):
        t0 = time.monotonic()
        r = httpx.post(f"{served.url}/api/show", json={"model": name}, timeout=30)
        assert time.monotonic() - t0 < 10  # a FIFO must not tie up a worker
        assert r.status_code == 404, (name, r.text)
        assert "root:" not in r.text and "GGUF" not in r.text
        answers[name] = r.json()["error"].replace(name[:200], "NAME")
        r = httpx.get(f"{served.url}/v1/models/{name.lstrip('/')}", timeout=30)
        assert r.status_code == 404, (name, r.text)
    assert len(set(answers.values())) == 1  # one answer, whether the file exists or not
    # a file inside --models-dir works by file name and by path, and is listed
    r = httpx.post(f"{served.url}/api/show", json={"model": "tiny.gguf"}, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{served.url}/api/show", json={"model": str(models / "tiny.gguf")}, timeout=30).status_code == 200
    assert "tiny.gguf" in [m["id"] for m in httpx.get(f"{served.url}/v1/models", timeout=30).json()["data"]]


def test_another_local_user_cannot_reach_files_through_the_server(served: ServeProcess, root: Path,
                                                                   smollm2_path: Path):
    runuser = shutil.which("runuser") or shutil.which("setpriv")
    if os.geteuid() != 0 or runuser is None:
        pytest.skip("needs root and runuser/setpriv to act as another user")
    secret = root / "owners-only.gguf"
    shutil.copyfile(smollm2_path, secret)
    os.chmod(secret, 0o600)
    code = (f"import urllib.request, json; r = urllib.request.Request('{served.url}/api/show', "
            f"data=json.dumps({{'model': '{secret}'}}).encode(), headers={{'Content-Type': 'application/json'}});\n"
            "try:\n urllib.request.urlopen(r); print(200)\nexcept Exception as e: print(getattr(e, 'code', e))")
    argv = ([runuser, "-u", "nobody", "--"] if runuser.endswith("runuser") else
            [runuser, "--reuid=65534", "--regid=65534", "--clear-groups"])
    py = "/usr/bin/python3"  # the other user cannot run our venv's interpreter; the stdlib is enough
    if not os.access(py, os.X_OK):
        pytest.skip("no system python3 for the other user")
    out = subprocess.run([*argv, py, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.stdout.strip() == "404", out.stdout + out.stderr


# -- 5. slow and half-sent requests, per-request costs -------------------------------------


def test_half_sent_requests_are_cut_off_and_do_not_starve_others(root: Path, monkeypatch: pytest.MonkeyPatch):
    import psutil

    from hearth.server import app as app_module
    from hearth.server import http as http_module

    monkeypatch.setattr(http_module, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(app_module, "BODY_TIMEOUT_SECONDS", 1.0)
    with _Server(create_app([])) as s:
        me = psutil.Process()
        fds0 = me.num_fds()
        socks = []
        for _ in range(200):
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
            socks.append(c)
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200  # others still served
        time.sleep(2.5)
        closed = 0
        for c in socks:
            c.settimeout(0.5)
            try:
                closed += c.recv(1) == b""
            except OSError:
                closed += 1
            c.close()
        assert closed == len(socks)
        # a body that trickles in gets a 408
        c = socket.create_connection(("127.0.0.1", s.port))
        c.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"mo")
        c.settimeout(5)
        assert b" 408 " in c.recv(200)
        c.close()
        time.sleep(0.5)
        assert me.num_fds() <= fds0 + 5


def test_per_request_costs_are_bounded(served: ServeProcess):
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{served.url}/v1/chat/completions", json={"model": "smollm2", "messages": msgs,
                                                               "stop": [f"s{i}" for i in range(200000)]}, timeout=60)
    assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "smollm2", "prompt": ["hi"] * 100,
                                                          "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "at most" in r.json()["error"]["message"]
    r = httpx.post(f"{served.url}/v1/chat/completions", json={"model": "smollm2", "messages": msgs, "n": 100},
                   timeout=60)
    assert r.status_code == 400


# -- 7. what used to be 500s -----------------------------------------------------------------

_BAD = [
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":2}'),
    ("/v1/chat/completions", b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}'),
    ("/api/generate", b'{"model":"smollm2","prompt":"\\udfff x","stream":false,"options":{"num_predict":2}}'),
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":[{"type":"text"}]}]}'),
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":[{"type":"text","text":5}]}]}'),
    # (a one-model server answers generation requests for unknown names with its model, as
    # llama-server: odd names are checked where names are looked up, not served)
    ("/api/show", b'{"model":"' + b"m" * 300 + b'"}'),
    ("/api/generate", b'{"model":"smollm2","prompt":"hi","stream":false,"options":{"temperature":NaN}}'),
    ("/api/generate", b'{"model":"smollm2","prompt":"hi","stream":false,"options":{"repeat_penalty":Infinity}}'),
    ("/api/generate", b'{"model":"smollm2","prompt":"hi","stream":false,"options":{"top_k":4294967297}}'),
    ("/api/generate", b'{"model":"smollm2","prompt":"hi","stream":false,"options":{"repeat_last_n":4294967297}}'),
    ("/api/show", b'{"model":"' + b"x" * 5000 + b'.gguf"}'),
    ("/api/show", b'{"model":"a\\u0000b"}'),
]


@pytest.mark.parametrize("path,body", _BAD, ids=[f"{i}" for i in range(len(_BAD))])
def test_bad_values_are_4xx_in_the_apis_own_shape(served: ServeProcess, path: str, body: bytes):
    r = httpx.post(f"{served.url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err, str) if path.startswith("/api/") else isinstance(err["message"], str)
    assert "Traceback" not in r.text


def test_malformed_daemon_bodies_are_400(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_path: Path):
    from hearth.daemon.server import DaemonServer

    monkeypatch.setenv("HEARTH_RUNTIME_DIR", str(tmp_path / "rt"))
    d = DaemonServer([str(smollm2_path)], {"n_ctx": 256, "parallel": 1})
    with _Server(d.app) as s:
        for body in (b'[1, 2]', b'{"prompt": "hi", "config": [1]}', b'{"messages": "hi"}',
                     b'{"messages": [{"role": 1}]}', b'{"prompt": 5}', b'{"prompt": "hi", "system": 7}',
                     b'{"prompt": "hi", "config": {"temperature": "hot"}}', b'not json'):
            r = httpx.post(f"{s.url}/daemon/generate", content=body, headers={"Content-Type": "application/json"},
                           timeout=30)
            assert r.status_code == 400, (body, r.text)


# -- 9. a loaded model's file changed underneath --------------------------------------------


def test_a_model_file_truncated_while_loaded_is_refused_not_fatal(root: Path, smollm2_path: Path):
    models = root / "models9"
    models.mkdir(exist_ok=True)
    f = models / "victim.gguf"
    shutil.copyfile(smollm2_path, f)
    body = {"model": "victim.gguf", "prompt": "Hello", "stream": False, "options": {"num_predict": 2}}
    with ServeProcess(root, "--n-ctx", "256", "--parallel", "1", "--models-dir", str(models)) as s:
        assert httpx.post(f"{s.url}/api/generate", json=body, timeout=60).status_code == 200
        with open(f, "r+b") as fh:  # truncate in place: the same inode, half the bytes
            fh.truncate(f.stat().st_size // 2)
        r = httpx.post(f"{s.url}/api/generate", json=body, timeout=60)
        assert r.status_code in (400, 409), r.text  # refused (409), or the half file refused as a GGUF (400)
        assert s.alive()
        assert "victim.gguf" not in [m["name"] for m in httpx.get(f"{s.url}/api/ps", timeout=30).json()["models"]]
        shutil.copyfile(smollm2_path, f)  # written back whole: it loads afresh
        assert httpx.post(f"{s.url}/api/generate", json=body, timeout=60).status_code == 200
        assert s.alive()
