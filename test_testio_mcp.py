"""Tests for testio_mcp: behaviour through the public surfaces (CLI main(), MCP tools, one stdio
subprocess), with fakes only at the boundaries: the simulated TestIO account behind
httpx.MockTransport (or a loopback server), and a real SQLite file in tmp_path."""

import ast
import asyncio
import collections
import contextlib
import email.utils
import functools
import gc
import inspect
import io
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

import testio_mcp as tm

HERE = Path(__file__).resolve().parent
TOKEN = "tok-CANARY-7f3e9b21c4d8"           # searched for in every output, log and DB file
HTTP_TOKEN = "http-CANARY-0d5e8a7c61b94f"  # the bearer token of serve --transport http, as secret
BASE_URL = "http://testio.invalid/customer/v2"
NOW = datetime(2026, 11, 27, tzinfo=timezone.utc)


###############################################################################
# Simulated account: the test-only parts (scenario controls, truth, a clock to advance)
###############################################################################

class Poisoned(Exception):
    """Raised while rendering a poisoned test: the request that would show it answers 500."""


class Account(tm.SimulatedAccount):
    """The simulated account plus what only the tests and the bench use: scenario controls that change
    it, truth accessors that read it, and a clock that stands still until `advance()`.

    A scenario control freezes the test it touches (it no longer moves on with the clock)."""

    LOG_CAP = 10_000

    def __init__(self, *, at: datetime | None = None, **options) -> None:
        self.at: datetime | None = None  # the account's clock (default: where its history ends)
        super().__init__(clock=lambda: self.at, **options)
        self.at = at or datetime.fromtimestamp(self._origin, timezone.utc)
        self._max_id = tm._SIM_TEST_ID_BASE
        self._poisoned: set[int] = set()
        self._bug_changes: dict[int, dict] = {}  # bug id -> the fields a scenario control set
        self.requests: collections.Counter = collections.Counter()  # accepted requests by route
        self.request_log: list[str] = []  # the last LOG_CAP request paths with their query

    def handler(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.request_log.append(request.url.raw_path.decode("ascii", "replace"))
            if len(self.request_log) > self.LOG_CAP:
                del self.request_log[0]
            try:
                response = super().handler(request)
            except Poisoned:
                response = tm._sim_error(500, "Internal Server Error")
            if response.status_code not in (401, 405):
                self.requests[request.url.path.split("/customer/v2/")[-1].split("/")[0]] += 1
            return response

    def _test_doc(self, t) -> dict:
        if t.id in self._poisoned:
            raise Poisoned(t.id)
        return super()._test_doc(t)

    def _bugs(self, t) -> list[dict]:
        bugs = super()._bugs(t)
        for bug in bugs:
            bug.update(self._bug_changes.get(bug["id"], ()))
        return bugs

    @contextlib.contextmanager
    def _frozen(self, test_id: int):
        """The test, caught up and off the clock from now on (under the lock): a control sets it."""
        with self._lock:
            self._catch_up()
            t = self._tests[test_id]
            t.alive, t.born = False, self._at
            yield t

    # -- the clock ------------------------------------------------------------------------

    def advance(self, delta: timedelta) -> None:
        """Move the account's clock forward; it catches up at its next request or accessor."""
        with self._lock:
            self.at += delta

    # -- scenario controls ----------------------------------------------------------------

    def add_tests(self, product_id: int, n: int) -> list[int]:
        """Add n tests ending just after the newest ended one (or running now); return their ids."""
        with self._lock:
            self._catch_up()
            now, p = self._at, self._products[product_id]
            ended = [t.end for t in p.order if t.end <= now]
            newest = max(ended, default=now - tm._SIM_DAY)
            step = max(60, (now - newest) // (n + 1))
            ids = []
            self._max_id = max(self._max_id, max(self._tests, default=0))
            for k in range(n):
                self._max_id += 1 + self._max_id % 3
                tid, end = self._max_id, newest + step * (k + 1)
                nbugs = self._bug_count(random.Random(tm._sim_seed(self._seed, 5, tid)))
                status = "locked" if end <= now else "running"
                t = tm._SimTest(tid, product_id, end, status, max(nbugs, 3), now, status, alive=False)
                self._tests[tid] = t
                p.order.append(t)
                ids.append(tid)
            p.dirty = True
            return ids

    def set_test_status(self, test_id: int, status: str) -> None:
        """Change a test's status; its visible bugs and their statuses follow from it."""
        if status not in tm.TEST_STATUSES:
            raise ValueError(f"unknown test status {status!r}; use one of {tm.TEST_STATUSES}")
        with self._frozen(test_id) as t:
            t.status = t.status0 = status

    def move_test(self, test_id: int, end_at: datetime) -> None:
        """Change a test's end_at (naive means UTC); its place in the pages follows."""
        if end_at.tzinfo is None:
            end_at = end_at.replace(tzinfo=timezone.utc)
        with self._frozen(test_id) as t:
            t.status0, t.end = t.status, int(end_at.timestamp())
            self._products[t.product_id].dirty = True

    def add_bugs(self, test_id: int, n: int) -> list[int]:
        """Have testers report n more bugs on a test; return the ids of those visible now."""
        with self._frozen(test_id) as t:
            before = self._reporting(t)[0]
            t.nbugs = min(tm._SIM_BUG_STRIDE - 1, t.nbugs + n)
            return [t.id * tm._SIM_BUG_STRIDE + j for j in range(before + 1, self._reporting(t)[0] + 1)]

    def review_bug(self, bug_id: int, status: str, reason: str | None = None) -> None:
        """The customer's decision on a bug: accepted, rejected (with a REJECTION_REASONS key, as the
        default comment says it), auto_accepted, or forwarded again."""
        if status not in ("forwarded", "accepted", "rejected", "auto_accepted"):
            raise ValueError(f"unknown bug status {status!r}")
        if (status == "rejected") != (reason in tm.REJECTION_REASONS):
            raise ValueError(f"a rejection, and only it, takes a reason; got {status!r}, {reason!r}")
        comments = [{"id": bug_id * 10 + 3, "author": {"name": "Customer"},
                     "body": tm.REJECTION_REASONS[reason]}] if status == "rejected" else []
        with self._lock:
            self._catch_up()
            self._bug_changes.setdefault(bug_id, {}).update(
                status="accepted" if status == "auto_accepted" else status,
                auto_accepted=status == "auto_accepted", comments=comments)

    def set_bug_severity(self, bug_id: int, severity: str) -> None:
        """Change a bug's severity, as TestIO's review may."""
        with self._lock:
            self._catch_up()
            self._bug_changes.setdefault(bug_id, {})["severity"] = severity

    def delete_test(self, test_id: int) -> None:
        """Remove a test and its bugs, as if the server no longer returned them."""
        with self._lock:
            self._catch_up()
            t = self._tests.pop(test_id)
            t.gone = True
            self._products[t.product_id].order.remove(t)
            self._poisoned.discard(test_id)

    def poison_test(self, test_id: int) -> None:
        """Make every page holding this test, and GET exploratory_tests/{id}, answer HTTP 500."""
        with self._lock:
            self._catch_up()
            if test_id not in self._tests:
                raise KeyError(test_id)
            self._poisoned.add(test_id)

    # -- truth ----------------------------------------------------------------------------

    def product_ids(self) -> list[int]:
        """Ids of all products, in API order."""
        return list(self._products)

    def products_json(self) -> list[dict]:
        """The products exactly as GET products returns them."""
        with self._lock:
            return json.loads(json.dumps([p.doc for p in self._products.values()]))

    def test_ids(self, product_id: int | None = None) -> list[int]:
        """Test ids newest first by end_at, for one product or across all."""
        with self._lock:
            self._catch_up()
            pids = [product_id] if product_id is not None else list(self._products)
            tests = [t for pid in pids for t in self._ordered(pid)]
            if product_id is None:
                tests.sort(key=lambda t: (-t.end, -t.id))
            return [t.id for t in tests]

    def test_json(self, test_id: int) -> dict:
        """The test as GET exploratory_tests/{id} serves it, poison aside; KeyError if unknown."""
        with self._lock:
            self._catch_up()
            return json.loads(json.dumps(super()._test_doc(self._tests[test_id])))

    def bug_ids(self, test_id: int | None = None, product_id: int | None = None) -> list[int]:
        """Sorted ids of the bugs the API currently serves, optionally for one test or product."""
        with self._lock:
            self._catch_up()
            tests = [self._tests[test_id]] if test_id is not None else self._tests.values()
            return sorted(t.id * tm._SIM_BUG_STRIDE + j for t in tests
                          if product_id is None or t.product_id == product_id
                          for j in range(1, self._reporting(t)[0] + 1))

    def bugs_of(self, test_id: int) -> list[dict]:
        """The bugs of one test as the bugs endpoint returns them; KeyError if unknown."""
        with self._lock:
            self._catch_up()
            return json.loads(json.dumps(self._bugs(self._tests[test_id])))

    def features_of(self, product_id: int) -> list[dict]:
        """All features of a product, deduped across sections, sorted by id."""
        with self._lock:
            return json.loads(json.dumps(sorted(self._products[product_id].features,
                                                key=lambda f: f["id"])))


def demo_truth() -> Account:
    """The --demo account as it stands at NOW (its clock held there)."""
    return Account(**tm.DEMO_ACCOUNT, at=NOW)



###############################################################################
# Fixtures and helpers shared by every section
###############################################################################

@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def canary_sweep(tmp_path_factory):
    """After the whole suite: the token is in no file any test left behind (databases with their -wal
    and -shm, subprocess stdout/stderr captures, logs), except the .env files tests wrote it into."""
    yield
    leaks = []
    for path in tmp_path_factory.getbasetemp().rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.name.endswith(".env"):
            with contextlib.suppress(OSError):
                content = path.read_bytes()
                if TOKEN.encode() in content or HTTP_TOKEN.encode() in content:
                    leaks.append(str(path))
    assert leaks == [], f"a canary token leaked into {leaks}"


def clean_environment(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """A clean environment under `root`: token, fake base URL, DB in root/data, no retry waits, DEBUG
    logs, HOME and cwd in root (no stray .env files); returns the database path."""
    for name in list(os.environ):
        if name.startswith("TESTIO_") or name in ("MAX_CONCURRENT_API_REQUESTS", "LOG_LEVEL"):
            mp.delenv(name)
    (root / "home").mkdir(exist_ok=True)
    mp.setenv("HOME", str(root / "home"))
    mp.chdir(root)
    mp.setenv("TESTIO_CUSTOMER_API_TOKEN", TOKEN)
    mp.setenv("TESTIO_CUSTOMER_API_BASE_URL", BASE_URL)
    mp.setenv("TESTIO_DB_PATH", str(root / "data" / "cache.db"))
    mp.setenv("TESTIO_RETRY_BASE_SECONDS", "0")
    mp.setenv("LOG_LEVEL", "DEBUG")
    return root / "data" / "cache.db"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """clean_environment() for one test; the database path."""
    return clean_environment(monkeypatch, tmp_path)


def make_account(**kw) -> Account:
    """A small deterministic account that answers to the canary token; its clock stands at NOW."""
    options = {"seed": 7, "products": 3, "tests_per_product": 120, "now": NOW, "token": TOKEN}
    options.update(kw)
    return Account(**options)


@pytest.fixture
def account():
    return make_account()


class Faults:
    """Wraps a handler: `rules` are (predicate(request, n) -> httpx.Response | Exception | None)."""

    def __init__(self, handler):
        self.handler = handler
        self.rules = []
        self.calls = 0
        self.log: list[str] = []

    def add(self, rule):
        self.rules.append(rule)
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.log.append(f"{request.url.path}?{request.url.query.decode()}")
        for rule in self.rules:
            outcome = rule(request, self.calls)
            if isinstance(outcome, Exception):
                raise outcome
            if outcome is not None:
                return outcome
        return self.handler(request)


def readme_code_blocks(text: str | None = None) -> list[tuple[str, str]]:
    """README's fenced code blocks (or those of `text`, a part of it): (language, text)."""
    readme = (HERE / "README.md").read_text(encoding="utf-8") if text is None else text
    return re.findall(r"^```(\w*)\n(.*?)^```", readme, flags=re.M | re.S)


def readme_section(title: str) -> str:
    """The text of README's `## title` section, up to the next `## ` heading."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, flags=re.M | re.S).group(1)


def readme_quick_start() -> list[str]:
    """The commands of README's quick start for Linux and macOS (its first bash block), comments cut."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Quick start.*?^```bash\n(.*?)^```", readme, flags=re.M | re.S).group(1)
    return [re.sub(r"\s+#.*", "", line) for line in block.splitlines() if line.strip()]


def transport_for(handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def cli(capsys, *argv, transport=None):
    """Run main(argv); returns (exit code, stdout, stderr)."""
    code = tm.main(list(argv), transport=transport)
    out, err = capsys.readouterr()
    return code, out, err


def create_database(path: Path) -> None:
    """An empty database at `path`, as the first sync or server start creates it."""
    async def make():
        await (await tm.Database(path).open()).aclose()
    asyncio.run(make())


def db_rows(db_path, sql, args=()):
    conn = sqlite3.connect(str(db_path))
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def assert_matches_truth(db_path, acc: Account, product_ids=None):
    """The local data equals the simulator's truth: same tests, same bugs, no duplicates/orphans."""
    pids = product_ids or acc.product_ids()
    for pid in pids:
        local_tests = sorted(r[0] for r in db_rows(db_path, "SELECT id FROM tests WHERE product_id = ?", (pid,)))
        assert local_tests == sorted(acc.test_ids(pid)), f"tests of product {pid} differ"
        local_bugs = sorted(r[0] for r in db_rows(db_path, "SELECT id FROM bugs WHERE product_id = ?", (pid,)))
        assert local_bugs == sorted(acc.bug_ids(product_id=pid)), f"bugs of product {pid} differ"
        statuses = dict(db_rows(db_path, "SELECT id, status FROM tests WHERE product_id = ?", (pid,)))
        assert statuses == {t: acc.test_json(t)["status"] for t in acc.test_ids(pid)}
    assert db_rows(db_path, "SELECT count(*) FROM bugs WHERE test_id NOT IN (SELECT id FROM tests)")[0][0] == 0
    assert db_rows(db_path, "SELECT product_id, tests, bugs FROM counts WHERE tests OR bugs ORDER BY 1") == db_rows(
        db_path, "SELECT product_id, count(DISTINCT id), (SELECT count(*) FROM bugs b WHERE b.product_id = t.product_id) "
                 "FROM tests t GROUP BY product_id ORDER BY 1"), "the per-product counts drifted from the rows"
    assert db_rows(db_path, "PRAGMA integrity_check")[0][0] == "ok"


###############################################################################
# Data core: settings, sync modes, stop rule, poisoned pages, retries, faults, files, wheel
###############################################################################

# `import *` must not re-collect the shared file's tests here.

WAIT = 30.0  # upper bound of every wait on a subprocess, an event or a queue


###############################################################################
# Helpers: page logs, run history, a loopback API server, subprocess syncs
###############################################################################

def pages_read(request_log, pid, per_page=tm.PAGE_SIZE):
    """Page numbers of a product's test list requested at `per_page`, in request order."""
    pattern = re.compile(rf"/products/{pid}/exploratory_tests\?page=(\d+)&per_page={per_page}$")
    return [int(m.group(1)) for entry in request_log if (m := pattern.search(entry))]


def runs(db_path):
    """(mode, status) of every recorded sync run, oldest first."""
    return db_rows(db_path, "SELECT mode, status FROM sync_runs ORDER BY id")


LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO) ")  # LOG_LEVEL=DEBUG chatter


def one_line(text):
    """The text's only non-empty line, DEBUG/INFO log records aside (fails if there are several)."""
    lines = [line for line in text.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


@pytest.fixture
def lean_account():
    """The shared 3 x 120-test account with 2 bugs per test on average (this file syncs it often)."""
    return make_account(bugs_per_test=2)


def mock(handler):
    return httpx.MockTransport(handler)


def status_code_counter(handler, counter):
    """Wrap a handler so every answered status code is counted in `counter`."""
    def wrapped(request):
        response = handler(request)
        counter[response.status_code] += 1
        return response
    return wrapped


class Loopback:
    """A real HTTP server on 127.0.0.1 answering with `app(httpx.Request) -> httpx.Response`.

    `pause_after = N`: request N is answered, then `reached` is set, and every later request waits
    (bounded) for `release` before it is answered. An exception raised by `app` drops the connection."""

    def __init__(self, app):
        self.app = app
        self.count = 0
        self.pause_after = None
        self.reached = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with outer._lock:
                    outer.count += 1
                    n = outer.count
                if outer.pause_after is not None and n > outer.pause_after:
                    outer.release.wait(WAIT)
                request = httpx.Request("GET", f"http://127.0.0.1:{outer.port}{self.path}",
                                        headers=list(self.headers.items()))
                try:
                    response = outer.app(request)
                except httpx.HTTPError:
                    self.close_connection = True
                    return
                body = response.content
                with contextlib.suppress(OSError):
                    self.send_response(response.status_code)
                    for key, value in response.headers.items():
                        if key.lower() not in ("content-length", "transfer-encoding", "connection",
                                               "content-encoding"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                if n == outer.pause_after:
                    outer.reached.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/customer/v2"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(WAIT)


@pytest.fixture
def loopback():
    """Start Loopback servers with `loopback(app)`; all are shut down after the test."""
    servers = []

    def start(app):
        servers.append(Loopback(app))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def spawn_sync(tmp_path, base_url, *args, preexec_fn=None, name="sync"):
    """Start `python testio_mcp.py sync ARGS` against `base_url`; output goes to files in tmp_path."""
    env = {**os.environ, "TESTIO_CUSTOMER_API_BASE_URL": base_url, "LOG_LEVEL": "WARNING"}
    with open(tmp_path / f"{name}.out", "wb") as out, open(tmp_path / f"{name}.err", "wb") as err:
        # preexec_fn only sets an rlimit and a signal disposition (async-signal-safe enough here)
        return subprocess.Popen([sys.executable, str(HERE / "testio_mcp.py"), "sync", *args], env=env,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                preexec_fn=preexec_fn)  # noqa: PLW1509


def finish(proc, tmp_path, name="sync"):
    """Wait (bounded) for a spawned sync; returns (exit code, stdout, stderr)."""
    try:
        code = proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT)
        raise
    return (code, (tmp_path / f"{name}.out").read_text(errors="replace"),
            (tmp_path / f"{name}.err").read_text(errors="replace"))


###############################################################################
# Settings: environment over .env files, bad values, the token
###############################################################################

@pytest.mark.parametrize("sources, expected", [
    ({"environ": "env.db", "./.env": "dot.db"}, "env.db"),
    ({"environ": "env.db", "--env-file": "explicit.db"}, "env.db"),
    ({"--env-file": "explicit.db", "./.env": "dot.db", "~/.testio-mcp.env": "home.db"}, "explicit.db"),
    ({"./.env": "dot.db", "~/.testio-mcp.env": "home.db"}, "home.db"),
    ({"./.env": "dot.db"}, "dot.db"),
], ids=["env-over-dotenv", "env-over-env-file", "env-file-over-defaults", "home-over-dotenv", "dotenv"])
def test_settings_come_from_env_then_env_file_then_home_file_then_dotenv(env, capsys, tmp_path, monkeypatch,
                                                                         sources, expected):
    monkeypatch.delenv("TESTIO_DB_PATH")
    argv = []
    for source, name in sources.items():
        line = f'TESTIO_DB_PATH="{tmp_path / name}"\n'
        if source == "environ":
            monkeypatch.setenv("TESTIO_DB_PATH", str(tmp_path / name))
        elif source == "--env-file":
            (tmp_path / "explicit.env").write_text("# comment\n" + line)
            argv = ["--env-file", str(tmp_path / "explicit.env")]
        elif source == "./.env":
            (tmp_path / ".env").write_text(line)
        else:
            (tmp_path / "home" / ".testio-mcp.env").write_text("export " + line)
    code, out, err = cli(capsys, *argv, "sync", "--status")
    assert code == 0, err
    assert re.search(r"^no local data yet: (\S+) does not exist", out).group(1) == str(tmp_path / expected)


@pytest.mark.parametrize("name, value", [
    ("TESTIO_REFRESH_INTERVAL_SECONDS", "soon"),
    ("TESTIO_REFRESH_INTERVAL_SECONDS", "-5"),
    ("MAX_CONCURRENT_API_REQUESTS", "-3"),
    ("MAX_CONCURRENT_API_REQUESTS", "0"),
    ("MAX_CONCURRENT_API_REQUESTS", "2.5"),
    ("TESTIO_HTTP_TIMEOUT_SECONDS", "nan"),
    ("TESTIO_HTTP_TIMEOUT_SECONDS", "0"),
    ("TESTIO_RETRY_BASE_SECONDS", "fast"),
    ("TESTIO_PRODUCT_IDS", "12,abc"),
    ("TESTIO_PRODUCT_IDS", "12;13"),
    ("TESTIO_PRODUCT_IDS", "-4"),
    ("LOG_LEVEL", "LOUD"),
    ("LOG_LEVEL", "verbose"),
    ("TESTIO_CUSTOMER_API_BASE_URL", "ftp://api.test.io"),
    ("TESTIO_CHANGE_RETENTION_DAYS", "0"),
    ("TESTIO_CHANGE_RETENTION_DAYS", "half a year"),
    ("TESTIO_CHANGE_RETENTION_DAYS", "1000000"),
    ("TESTIO_REVIEW_WINDOW_DAYS", "0"),
    ("TESTIO_REVIEW_WINDOW_DAYS", "ten"),
    ("TESTIO_REVIEW_WINDOW_DAYS", "400"),
])
@pytest.mark.parametrize("where", ["environ", "dotenv"])
def test_bad_setting_exits_2_with_one_line_naming_the_variable_and_value(env, capsys, monkeypatch, tmp_path,
                                                                         name, value, where):
    if where == "environ":
        monkeypatch.setenv(name, value)
    else:
        monkeypatch.delenv(name, raising=False)
        (tmp_path / ".env").write_text(f"{name}={value}\n")
    code, out, err = cli(capsys, "sync")
    assert code == 2
    line = one_line(err)
    assert line.startswith("testio-mcp: ") and name in line and repr(value) in line
    assert out == "" and not env.exists()


@pytest.mark.parametrize("value, problem", [
    (HTTP_TOKEN[:15], "is too short (15 characters, at least 16)"),
    (HTTP_TOKEN + " x", "may hold only printable ASCII without spaces"),
    (HTTP_TOKEN + "é", "may hold only printable ASCII without spaces"),
], ids=["short", "space", "non-ascii"])
def test_a_weak_or_unsendable_http_token_exits_2_without_showing_it(env, capsys, value, problem, monkeypatch):
    monkeypatch.setenv("TESTIO_MCP_HTTP_TOKEN", value)
    with busy_port() as port, restored_logging():
        code, out, err = cli(capsys, "serve", "--transport", "http", "--port", port)
    assert (code, out) == (2, "")
    assert one_line(err) == (f"testio-mcp: TESTIO_MCP_HTTP_TOKEN {problem}; make a random one with: "
                             f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    assert not env.exists()


def test_sync_without_token_says_which_variable_to_set_and_where_to_get_one(env, capsys, monkeypatch, lean_account):
    monkeypatch.delenv("TESTIO_CUSTOMER_API_TOKEN")
    code, _, err = cli(capsys, "sync", transport=mock(lean_account.handler))
    assert code == 1
    line = one_line(err)
    assert "TESTIO_CUSTOMER_API_TOKEN is not set" in line and "Integrations -> API" in line
    assert lean_account.request_log == [] and not env.exists()


###############################################################################
# Sync modes through the CLI
###############################################################################

def test_cold_incremental_sync_stores_all_products_features_tests_and_bugs(env, capsys, lean_account):
    code, _, err = cli(capsys, "sync", transport=mock(lean_account.handler))
    assert code == 0, err
    assert_matches_truth(env, lean_account)
    assert sorted(r[0] for r in db_rows(env, "SELECT id FROM products")) == sorted(lean_account.product_ids())
    for pid in lean_account.product_ids():
        assert sorted(r[0] for r in db_rows(env, "SELECT id FROM features WHERE product_id = ?", (pid,))) == \
            [f["id"] for f in lean_account.features_of(pid)]
    assert runs(env) == [("incremental", "success")]
    assert "incremental sync success" in err


def test_warm_incremental_sync_adds_new_tests_and_fetches_bugs_only_for_them(env, capsys, lean_account):
    transport = mock(lean_account.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    pid = lean_account.product_ids()[0]
    new = lean_account.add_tests(pid, 4)
    lean_account.request_log.clear()
    code, _, err = cli(capsys, "sync", transport=transport)
    assert code == 0, err
    assert_matches_truth(env, lean_account)
    bug_requests = [e for e in lean_account.request_log if "/bugs?" in e]
    asked = sorted(int(i) for e in bug_requests for i in re.search(r"filter_test_cycle_ids=([\d%C,]+)", e)
                   .group(1).replace("%2C", ",").split(","))
    assert asked == sorted(new)
    assert db_rows(env, "SELECT new_tests FROM sync_runs ORDER BY id DESC LIMIT 1") == [(4,)]


def deep_account(**kw):
    """One product deep enough (450 tests) that an incremental walk does not reach its end."""
    return make_account(products=1, tests_per_product=450, bugs_per_test=1, **kw)


def test_refresh_picks_up_a_status_change_of_a_non_final_test_beyond_the_incremental_pages(env, capsys):
    acc = deep_account()
    pid = acc.product_ids()[0]
    deep = acc.test_ids(pid)[420]
    acc.set_test_status(deep, "running")  # non-final; shows a third of its bugs
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    bugs_before = len(acc.bug_ids(deep))
    acc.set_test_status(deep, "locked")   # all bugs become visible
    assert len(acc.bug_ids(deep)) > bugs_before
    assert cli(capsys, "sync", transport=transport)[0] == 0
    assert db_rows(env, "SELECT status FROM tests WHERE id = ?", (deep,)) == [("running",)]  # out of reach
    code, _, err = cli(capsys, "sync", "--refresh", transport=transport)
    assert code == 0, err
    assert_matches_truth(env, acc)
    stored = dict(db_rows(env, "SELECT id, status FROM bugs WHERE test_id = ?", (deep,)))
    assert stored == {b["id"]: tm.bug_status(b) for b in acc.bugs_of(deep)}


def test_refresh_removes_a_non_final_test_the_api_answers_404_for(env, capsys):
    acc = deep_account()
    pid = acc.product_ids()[0]
    gone = acc.test_ids(pid)[400]
    acc.set_test_status(gone, "locked")
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    assert db_rows(env, "SELECT count(*) FROM bugs WHERE test_id = ?", (gone,))[0][0] > 0
    acc.delete_test(gone)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    assert db_rows(env, "SELECT count(*) FROM tests WHERE id = ?", (gone,)) == [(1,)]  # incremental can't see it
    acc.request_log.clear()
    code, _, err = cli(capsys, "sync", "--refresh", transport=transport)
    assert code == 0, err
    assert f"/exploratory_tests/{gone}" in "\n".join(acc.request_log)
    assert_matches_truth(env, acc)
    assert db_rows(env, "SELECT count(*) FROM bugs WHERE test_id = ?", (gone,)) == [(0,)]


def test_force_rereads_every_page_and_removes_a_deleted_final_test(env, capsys):
    acc = deep_account()
    pid = acc.product_ids()[0]
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    gone = acc.test_ids(pid)[430]
    assert acc.test_json(gone)["status"] in tm.FINAL_STATUSES
    acc.delete_test(gone)
    acc.request_log.clear()
    code, _, err = cli(capsys, "sync", "--force", transport=transport)
    assert code == 0, err
    assert pages_read(acc.request_log, pid) == [1, 2, 3, 4, 5, 6]  # 6 read ahead past short 5
    assert_matches_truth(env, acc)
    assert runs(env)[-1] == ("force", "success")


class Abreast:
    """An async handler that holds the requests matching `pattern` until `width` of them are in flight
    at once (or WAIT passes), and records the most it saw in flight together."""

    def __init__(self, handler, pattern: str, width: int):
        self.handler, self.pattern, self.width = handler, re.compile(pattern), width
        self.in_flight = self.peak = 0
        self.full = None  # made on the event loop of the first matching request

    async def __call__(self, request):
        if not self.pattern.search(request.url.path):
            return self.handler(request)
        self.full = self.full or asyncio.Event()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.in_flight >= self.width:
            self.full.set()
        try:
            await asyncio.wait_for(self.full.wait(), WAIT)
        except TimeoutError:
            self.full.set()  # the others need not wait too: the peak already says what happened
        self.in_flight -= 1
        return self.handler(request)


def test_force_checks_the_tests_its_walk_did_not_list_concurrently_within_the_request_limit(
        env, capsys, monkeypatch):
    monkeypatch.setenv("MAX_CONCURRENT_API_REQUESTS", "3")
    acc = deep_account()
    pid = acc.product_ids()[0]
    assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
    gone = acc.test_ids(pid)[400:406]
    for test_id in gone:
        acc.delete_test(test_id)
    acc.request_log.clear()
    abreast = Abreast(acc.handler, r"/exploratory_tests/\d+$", width=3)
    code, _, err = cli(capsys, "sync", "--force", transport=mock(abreast))
    assert code == 0, err
    assert abreast.peak == 3  # three tests asked about at once, never more than the limit
    asked = [int(m.group(1)) for e in acc.request_log if (m := re.search(r"/exploratory_tests/(\d+)$", e))]
    assert sorted(asked) == sorted(gone)
    assert_matches_truth(env, acc)


@pytest.mark.parametrize("tests, flags, pages", [
    (250, (), [1, 2, 3]),                # a cold walk of a small product: one round trip, no waste
    (450, (), [1, 2, 3, 4, 5, 6]),       # two; page 6, past the short page 5, is the one wasted
    (450, ("--force",), [1, 2, 3, 4, 5, 6]),
])
def test_a_walk_that_reads_every_page_asks_for_read_ahead_pages_at_once(env, capsys, tests, flags,
                                                                          pages):
    acc = make_account(products=1, tests_per_product=tests, bugs_per_test=0.2)
    pid = acc.product_ids()[0]
    if flags:
        assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
        acc.request_log.clear()
    assert tm.READ_AHEAD_PAGES == 3
    abreast = Abreast(acc.handler, r"/exploratory_tests$", width=3)
    code, _, err = cli(capsys, "sync", *flags, transport=mock(abreast))
    assert code == 0, err
    assert abreast.peak == 3  # pages 1-3 were in flight together: the walk did not await each
    assert pages_read(acc.request_log, pid) == pages
    assert_matches_truth(env, acc)
    assert db_rows(env, "SELECT walk_mode, walk_next_page, last_status FROM product_sync") == [
        (None, None, "success")]


def test_a_walk_reads_no_page_ahead_when_other_requests_hold_every_slot(env, capsys, monkeypatch):
    monkeypatch.setenv("MAX_CONCURRENT_API_REQUESTS", "1")  # the features request holds the one slot
    acc = make_account(products=1, tests_per_product=450, bugs_per_test=0.2)
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert pages_read(acc.request_log, acc.product_ids()[0]) == [1, 2, 3, 4, 5]  # none past the end
    assert_matches_truth(env, acc)


def test_nuke_refuses_without_yes_when_stdin_is_not_a_terminal(env, capsys, monkeypatch, lean_account):
    transport = mock(lean_account.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    before = db_rows(env, "SELECT count(*) FROM tests")
    requests = sum(lean_account.requests.values())
    code, _, err = cli(capsys, "sync", "--nuke", transport=transport)
    assert code == 1
    assert "add --yes" in one_line(err)
    assert db_rows(env, "SELECT count(*) FROM tests") == before and before[0][0] == 360
    assert sum(lean_account.requests.values()) == requests


def test_nuke_with_yes_wipes_local_only_rows_and_resyncs(env, capsys, lean_account):
    transport = mock(lean_account.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    pid = lean_account.product_ids()[0]
    conn = sqlite3.connect(env)
    with conn:
        conn.execute("INSERT INTO tests (id, product_id, title, status, testing_type, raw, changed_at) "
                     "VALUES (999999, ?, 'stale', 'archived', 'coverage', '{}', '2020-01-01T00:00:00Z')", (pid,))
        conn.execute("INSERT INTO problematic_events (event_id, product_id, page, per_page, offset_start, "
                     "offset_end, attempts, first_seen_at, last_seen_at) VALUES ('e1', ?, 1, 100, 0, 1, 1, "
                     "'2020-01-01T00:00:00Z', '2020-01-01T00:00:00Z')", (pid,))
    conn.close()
    code, _, err = cli(capsys, "sync", "--nuke", "--yes", transport=transport)
    assert code == 0, err
    assert_matches_truth(env, lean_account)
    assert db_rows(env, "SELECT count(*) FROM problematic_events") == [(0,)]
    assert runs(env) == [("incremental", "success"), ("nuke", "success")]


def test_changed_at_moves_only_for_the_tests_and_bugs_whose_data_changed(env, capsys, lean_account):
    transport = mock(lean_account.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    long_ago = "2026-01-01T00:00:00Z"
    conn = sqlite3.connect(env)
    with conn:
        conn.execute("UPDATE tests SET changed_at = ?", (long_ago,))
        conn.execute("UPDATE bugs SET changed_at = ?", (long_ago,))
    conn.close()
    before = {t: dict(db_rows(env, f"SELECT id, raw FROM {t}")) for t in ("tests", "bugs")}
    running = db_rows(env, "SELECT min(id) FROM tests WHERE status = 'running'")[0][0]
    lean_account.set_test_status(running, "locked")
    assert cli(capsys, "sync", transport=transport)[0] == 0
    changed = {t: {i for i, raw in db_rows(env, f"SELECT id, raw FROM {t}")
                   if before[t].get(i) != raw} for t in before}
    assert changed["tests"] == {running} and changed["bugs"]
    assert {t: {i for (i,) in db_rows(env, f"SELECT id FROM {t} WHERE changed_at > ?", (long_ago,))}
            for t in before} == changed


DATA_TABLES = ("products", "features", "tests", "test_features", "bugs", "counts", "product_sync",
               "problematic_events", "problematic_tests")


def every_row(db_path):
    """Every row of the synced data (the run history aside)."""
    return {t: db_rows(db_path, f"SELECT * FROM {t} ORDER BY 1, 2") for t in DATA_TABLES}


@pytest.mark.parametrize("answer, shown", [(401, "the TestIO API rejected the token (HTTP 401 on GET products)"),
                                           (503, "GET products: HTTP 503 after 5 attempts")],
                         ids=["rejected-token", "api-down"])
def test_nuke_that_cannot_read_the_product_list_leaves_the_old_data_exactly_as_it_was(
        env, capsys, lean_account, answer, shown):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    conn = sqlite3.connect(env)
    with conn:  # a hand-entered mapping too: --nuke would have dropped it
        conn.execute("INSERT INTO problematic_events (event_id, product_id, page, per_page, offset_start, "
                     "offset_end, attempts, first_seen_at, last_seen_at) VALUES ('e1', ?, 1, 100, 0, 1, 1, "
                     "'2020-01-01T00:00:00Z', '2020-01-01T00:00:00Z')", (lean_account.product_ids()[0],))
        conn.execute("INSERT INTO problematic_tests VALUES ('e1', 4242, '2020-01-01T00:00:00Z')")
    conn.close()
    before = every_row(env)
    failing = mock(Faults(lean_account.handler).add(lambda request, n: httpx.Response(answer)))
    code, _, err = cli(capsys, "sync", "--nuke", "--yes", transport=failing)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"testio-mcp: sync failed: {shown}"), err
    assert every_row(env) == before and len(before["tests"]) == 360
    assert runs(env) == [("incremental", "success"), ("nuke", "failed")]


@pytest.mark.parametrize("how", ["flag", "environ"])
def test_product_ids_limit_the_sync_to_those_products(env, capsys, monkeypatch, lean_account, how):
    a, _, c = lean_account.product_ids()
    argv = ["sync"]
    if how == "flag":
        argv += ["--product-ids", f"{c},{a}"]
    else:
        monkeypatch.setenv("TESTIO_PRODUCT_IDS", f"{c},{a}")
    code, _, err = cli(capsys, *argv, transport=mock(lean_account.handler))
    assert code == 0, err
    assert sorted(r[0] for r in db_rows(env, "SELECT id FROM products")) == sorted([a, c])
    assert sorted(r[0] for r in db_rows(env, "SELECT DISTINCT product_id FROM tests")) == sorted([a, c])
    assert_matches_truth(env, lean_account, [a, c])


def test_unknown_product_id_fails_naming_it_and_the_visible_ids(env, capsys, lean_account):
    a, b, c = lean_account.product_ids()
    code, _, err = cli(capsys, "sync", "--product-ids", f"{a},424242", transport=mock(lean_account.handler))
    assert code == 1
    line = [ln for ln in err.splitlines() if ln.startswith("testio-mcp:")]
    assert line == [(f"testio-mcp: sync failed: product id(s) 424242 are not visible to this token; "
                     f"visible: {', '.join(map(str, sorted([a, b, c])))}")]
    assert db_rows(env, "SELECT count(*) FROM tests") == [(0,)]
    assert runs(env) == [("incremental", "failed")]


def test_since_stops_the_walk_at_the_first_page_entirely_older_than_the_date(env, capsys):
    acc = deep_account()
    pid = acc.product_ids()[0]
    order = acc.test_ids(pid)
    ends = [tm.to_utc(acc.test_json(t)["end_at"]) for t in order]
    since = date.fromisoformat(ends[150][:10])
    cut = f"{since.isoformat()}T00:00:00Z"
    last = next(p for p in range(1, 6) if all(e < cut for e in ends[(p - 1) * 100:p * 100]))
    assert 2 <= last < 5
    code, _, err = cli(capsys, "sync", "--since", since.isoformat(), transport=mock(acc.handler))
    assert code == 0, err
    assert pages_read(acc.request_log, pid) == list(range(1, last + 1))
    stored = sorted(r[0] for r in db_rows(env, "SELECT id FROM tests"))
    assert stored == sorted(order[:last * 100])
    assert all(t in stored for t, e in zip(order, ends) if e >= cut)


def test_sync_status_shows_path_counts_products_and_runs(env, capsys, lean_account):
    transport = mock(lean_account.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    assert cli(capsys, "sync", "--product-ids", "1", transport=transport)[0] == 1
    code, out, err = cli(capsys, "sync", "--status")
    assert code == 0, err
    bugs = db_rows(env, "SELECT count(*) FROM bugs")[0][0]
    features = db_rows(env, "SELECT count(*) FROM features")[0][0]
    assert f"database   {env} (" in out
    assert (f"contents   3 products, {features} features, 360 tests, {bugs} bugs, 2 sync_runs, "
            f"0 problematic_events") in out
    for pid in lean_account.product_ids():
        row = next(ln for ln in out.splitlines() if ln.startswith(f"{pid} "))
        product_bugs = len(lean_account.bug_ids(product_id=pid))
        assert re.search(rf"\s120\s+{product_bugs}\s+\d{{4}}-\d\d-\d\dT\S+Z\s+success$", row), row
    run_lines = [ln for ln in out.splitlines() if re.match(r"\d+\s+incremental\s+cli", ln)]
    assert [ln.split()[0] + " " + ln.split()[4] for ln in run_lines] == ["2 failed", "1 success"]
    assert "product id(s) 1 are not visible" in out


@pytest.mark.parametrize("argv", [["sync", "--status"], ["problematic", "list"], ["problematic", "clear", "--yes"]])
def test_read_only_commands_without_a_database_say_there_is_no_local_data_yet_and_create_no_file(
        env, capsys, monkeypatch, argv):
    monkeypatch.delenv("TESTIO_CUSTOMER_API_TOKEN")
    monkeypatch.setenv("LOG_LEVEL", "INFO")
    code, out, err = cli(capsys, *argv)
    assert (code, err) == (0, "")
    assert out == (f"no local data yet: {env} does not exist; fetch it with `testio-mcp sync` once "
                   f"TESTIO_CUSTOMER_API_TOKEN is set (or try `testio-mcp --demo sync`)\n")
    assert not env.parent.exists()


def test_sync_status_on_an_empty_database_says_never(env, capsys):
    create_database(env)
    code, out, err = cli(capsys, "sync", "--status")
    assert code == 0, err
    assert "contents   0 products, 0 features, 0 tests, 0 bugs, 0 sync_runs, 0 problematic_events" in out
    assert "last good  never" in out


def test_the_cli_commands_but_serve_never_import_the_mcp_sdk_or_pydantic(env, loopback):
    """Their start-up never pays for the SDK's import (a fresh process: this one has it loaded)."""
    api = loopback(make_account(products=1, tests_per_product=5).handler)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import testio_mcp; "
              "codes = [testio_mcp.main(a.split()) for a in ('sync', 'sync --status', 'problematic list')]; "
              "print(codes, sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:])))")
    heavy = ("mcp", "mcp_types", "pydantic", "pydantic_core", "starlette", "uvicorn")  # (httpx needs anyio)
    proc = subprocess.run([sys.executable, "-c", script, str(HERE), *heavy], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=WAIT,
                          env={**os.environ, "TESTIO_CUSTOMER_API_BASE_URL": api.base_url, "LOG_LEVEL": "WARNING"})
    assert proc.stdout.splitlines()[-1] == "[0, 0, 0] []", proc.stdout + proc.stderr


###############################################################################
# The incremental stop rule
###############################################################################

@pytest.mark.slow
@pytest.mark.parametrize("tests, new_on_top, expected_pages", [
    (520, 0, [1, 2, 3]),           # page 1 holds known tests: read 2 more
    (520, 150, [1, 2, 3, 4]),      # page 1 all new, page 2 holds the first known test
    (520, 260, [1, 2, 3, 4, 5]),   # page 3 holds the first known test
    (150, 0, [1, 2]),              # page 2 is short: stop there
    (230, 0, [1, 2, 3]),           # page 3 is short and also the last safety page
    (120, 90, [1, 2, 3]),          # 210 tests now: page 3 short
])
def test_incremental_sync_reads_exactly_safety_pages_past_the_first_page_with_a_known_test(
        env, capsys, tests, new_on_top, expected_pages):
    acc = make_account(products=1, tests_per_product=tests, bugs_per_test=0.2)
    pid = acc.product_ids()[0]
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    new = acc.add_tests(pid, new_on_top) if new_on_top else []
    for k, test_id in enumerate(new):  # above the running and scheduled tests: page 1 onwards
        acc.move_test(test_id, NOW + timedelta(days=90, minutes=k))
    assert tm.SAFETY_PAGES == 2
    acc.request_log.clear()
    code, _, err = cli(capsys, "sync", transport=transport)
    assert code == 0, err
    assert pages_read(acc.request_log, pid) == expected_pages
    stored = {r[0] for r in db_rows(env, "SELECT id FROM tests")}
    assert set(new) <= stored


@pytest.mark.slow
def test_a_5000_test_product_syncs_completely(env, capsys, monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    acc = make_account(products=1, tests_per_product=5000, bugs_per_test=0.1)
    pid = acc.product_ids()[0]
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert pages_read(acc.request_log, pid) == list(range(1, 52))
    assert_matches_truth(env, acc)


def walk(rule: "tm.WalkRule", tests: int,
         ends: list[str] | None = None) -> tuple[list[int], str, str]:
    """Drive `rule` over a newest-first list of `tests` test ids 0, 1, ... (id = position), with
    their `ends` if given: (pages read, how the walk stopped, each page's checkpoint mode)."""
    pages, modes, page = [], "", 1
    while len(pages) < 50:
        ids = range((page - 1) * tm.PAGE_SIZE, min(page * tm.PAGE_SIZE, tests))
        pages.append(page)
        modes += rule.mode[0]
        step = rule.after(page, [{"id": i, "end_at": ends[i] if ends else None} for i in ids],
                          len(ids) < tm.PAGE_SIZE)
        if step.page is None:
            return pages, step.action, modes
        assert step.page > page, f"{step} after page {page}"
        page = step.page
    raise AssertionError(f"no end after {pages}")


def known_from(position: int | None) -> set[int]:
    """The ids from `position` on (of at most 1,000 tests) as known; None: nothing known."""
    return set() if position is None else set(range(position, 1000))


def cp(next_page: int, full: bool, known: int | None = None,
       per_page: int = 100) -> "tm.Checkpoint":
    return tm.Checkpoint(next_page=next_page, per_page=per_page, full=full, known=known_from(known))


@pytest.mark.parametrize("full, tests, known, resume, min_pages, pages, end, modes", [
    (True, 520, None, None, 0, [1, 2, 3, 4, 5, 6], "end", "ffffff"),  # full: to the short page
    (True, 600, None, None, 0, [1, 2, 3, 4, 5, 6, 7], "end", "fffffff"),  # ... or the empty one
    (False, 520, 0, None, 0, [1, 2, 3], "stop", "iii"),  # a known test on page 1: 2 pages more
    (False, 520, 150, None, 0, [1, 2, 3, 4], "stop", "iiii"),  # ... on page 2
    (False, 520, 299, None, 0, [1, 2, 3, 4, 5], "stop", "iiiii"),  # ... last on page 3
    (False, 150, 0, None, 0, [1, 2], "end", "ii"),  # the list ends before the margin
    (False, 520, None, None, 0, [1, 2, 3, 4, 5, 6], "end", "iiiiii"),  # nothing known: to the end
    (False, 900, 0, None, 5, [1, 2, 3, 4, 5], "stop", "iiiii"),  # --refresh: 5 pages at least
    (False, 900, 0, None, 2, [1, 2, 3], "stop", "iii"),  # ... fewer than the margin
    # an interrupted full walk: the incremental pages, then from one page before its checkpoint
    (False, 750, 0, cp(6, True), 0, [1, 2, 3, 5, 6, 7, 8], "end", "iiiffff"),
    (False, 750, 0, cp(2, True), 0, [1, 2, 3, 4, 5, 6, 7, 8], "end", "iiifffff"),
    (False, 750, 0, cp(5, True), 0, [1, 2, 3, 4, 5, 6, 7, 8], "end", "iiifffff"),
    # ... a checkpoint written at another page size: the page holding its position, minus one
    (False, 750, 0, cp(21, True, per_page=25), 0, [1, 2, 3, 5, 6, 7, 8], "end", "iiiffff"),
    (False, 750, 0, cp(25, True, per_page=25), 0, [1, 2, 3, 6, 7, 8], "end", "iiifff"),
    # an interrupted incremental walk: on until the tests known before it began, plus the margin
    (False, 1000, 0, cp(7, False, 650), 0, [1, 2, 3, 6, 7, 8, 9], "stop", "iiiiiii"),
    (False, 1000, 0, cp(7, False, 450), 0, [1, 2, 3, 6, 7, 8], "stop", "iiiiii"),
    (False, 1000, 0, cp(7, False), 0, [1, 2, 3, 6, 7, 8, 9, 10, 11], "end", "iiiiiiiii"),
    # a full walk's checkpoint is not used: it reads everything anyway
    (True, 750, None, cp(6, True), 0, [1, 2, 3, 4, 5, 6, 7, 8], "end", "ffffffff"),
])
def test_the_walk_rule_reads_the_margin_past_the_first_known_test_then_resumes_an_interrupted_walk(
        full, tests, known, resume, min_pages, pages, end, modes):
    rule = tm.WalkRule(full, known_from(known), checkpoint=resume, min_pages=min_pages)
    assert walk(rule, tests) == (pages, end, modes)


@pytest.mark.parametrize("full, newer, pages, end", [
    (True, 250, [1, 2, 3, 4], "stop"),     # page 4: the first whose tests all ended before the day
    (True, 300, [1, 2, 3, 4], "stop"),     # page 3 ends with the day's last test
    (True, 301, [1, 2, 3, 4, 5], "stop"),  # page 4 starts with it
    (True, 0, [1], "stop"),
    (False, 450, [1, 2, 3], "stop"),       # the incremental margin comes first
    (True, 520, [1, 2, 3, 4, 5, 6], "end"),
])
def test_the_walk_rule_stops_after_the_first_page_entirely_older_than_since(
        full, newer, pages, end):
    """The first `newer` tests ended on or after the day, the others before it; the API's offsets
    differ (a test that ended at 01:00+02:00 ended the day before in UTC)."""
    midnight, plus_2 = datetime(2026, 1, 1, tzinfo=timezone.utc), timezone(timedelta(hours=2))
    ends = [tm.iso(midnight + timedelta(hours=newer - p - 1)) if p < newer
            else (midnight - timedelta(hours=1 + p - newer)).astimezone(plus_2).isoformat()
            for p in range(520)]
    rule = tm.WalkRule(full, known_from(0), since=midnight.date())
    assert walk(rule, 520, ends)[:2] == (pages, end)


###############################################################################
# Poisoned pages: recovery by smaller pages, problematic events, map/retry/clear
###############################################################################

@pytest.mark.parametrize("position", [0, 99, 100, 137, 249])
def test_a_poisoned_test_is_the_only_one_missing_and_is_recorded_with_its_neighbours(env, capsys, position):
    acc = make_account(products=1, tests_per_product=250, bugs_per_test=1)
    pid = acc.product_ids()[0]
    order = acc.test_ids(pid)
    bad = order[position]
    acc.poison_test(bad)
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert "1 test position(s) could not be read; see `testio-mcp problematic list`" in err
    assert runs(env) == [("incremental", "completed_with_problems")]
    assert sorted(r[0] for r in db_rows(env, "SELECT id FROM tests")) == sorted(set(order) - {bad})
    assert sorted(r[0] for r in db_rows(env, "SELECT id FROM bugs")) == \
        sorted(set(acc.bug_ids(product_id=pid)) - set(acc.bug_ids(bad)))
    events = db_rows(env, "SELECT product_id, page, per_page, offset_start, offset_end, before_id, after_id, "
                          "before_end_at, after_end_at FROM problematic_events")
    before = order[position - 1] if position > 0 else None
    after = order[position + 1] if position + 1 < len(order) else None
    end_at = lambda t: tm.to_utc(acc.test_json(t)["end_at"]) if t else None
    assert events == [(pid, position // 100 + 1, 100, position, position + 1, before, after,
                       end_at(before), end_at(after))]


def test_a_poisoned_position_seen_by_a_later_sync_stays_one_event(env, capsys):
    acc = make_account(products=1, tests_per_product=250, bugs_per_test=1)
    acc.poison_test(acc.test_ids()[120])
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    first = db_rows(env, "SELECT event_id, attempts FROM problematic_events")
    assert cli(capsys, "sync", "--force", transport=transport)[0] == 0  # a full recovery again
    again = db_rows(env, "SELECT event_id, attempts FROM problematic_events")
    assert [e for e, _ in again] == [e for e, _ in first] and again[0][1] > first[0][1]


def reads_of(request_log, pid):
    """{per_page: [page, ...]} of a product's test-list requests, in request order."""
    pattern = re.compile(rf"/products/{pid}/exploratory_tests\?page=(\d+)&per_page=(\d+)$")
    reads = collections.defaultdict(list)
    for entry in request_log:
        if m := pattern.search(entry):
            reads[int(m.group(2))].append(int(m.group(1)))
    return dict(reads)


# A poisoned test at position 30 of page 1: the full recovery's failing reads (page 1 at 100 three
# times, then at 25, 10, 5, 2 and 1 the pages holding offset 30) and the pages that worked around it.
FULL_RECOVERY = {100: [1, 1, 1], 25: [1, 2, 2, 2, 3, 4], 10: [3, 4, 4, 4, 5], 5: [7, 7, 7, 8],
                 2: [16, 16, 16, 17, 18], 1: [31, 31, 31, 31, 31, 32]}
AROUND = {25: [1, 3, 4], 10: [3, 5], 5: [8], 2: [17, 18], 1: [32]}


def poisoned_at_30():
    """make_account() (3 products x 120 tests) with the test at position 30 of the first product
    poisoned; (account, its first product, the poisoned test)."""
    acc = make_account(bugs_per_test=1)
    pid = acc.product_ids()[0]
    bad = acc.test_ids(pid)[30]
    acc.poison_test(bad)
    return acc, pid, bad


def test_an_incremental_sync_reads_around_a_known_unreadable_position_with_the_pages_that_worked(env, capsys):
    acc, pid, bad = poisoned_at_30()
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    # the cold walk asked for pages 2 and 3 with page 1 (3 is past the end)
    assert reads_of(acc.request_log, pid) == {**FULL_RECOVERY, 100: [1, 2, 3, 1, 1]}
    event = db_rows(env, "SELECT event_id, attempts, last_seen_at FROM problematic_events")
    for _ in range(2):
        acc.request_log.clear()
        code, _, err = cli(capsys, "sync", transport=transport)
        assert code == 0 and "1 test position(s) could not be read" in err
        # 1 product list + the first product's 9 reads around position 30 and its page 2 + 2 pages
        # of each other product: 15 requests, where the full recovery again made 35
        assert len(acc.request_log) == 15
        assert reads_of(acc.request_log, pid) == {**AROUND, 100: [2]}
        assert runs(env)[-1] == ("incremental", "completed_with_problems")
        assert db_rows(env, "SELECT event_id, attempts, last_seen_at FROM problematic_events") == event
        assert sorted(r[0] for r in db_rows(env, "SELECT id FROM tests WHERE product_id = ?", (pid,))) == \
            sorted(set(acc.test_ids(pid)) - {bad})


def db_rows_write(db_path, sql, args=()):
    conn = sqlite3.connect(str(db_path))
    try:
        with conn:
            conn.execute(sql, args)
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["a-day-later", "force", "problematic-retry"])
def test_a_known_unreadable_position_gets_the_full_recovery_again_a_day_later_on_force_or_retry(
        env, capsys, trigger):
    acc, pid, bad = poisoned_at_30()
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    (attempts,), = db_rows(env, "SELECT attempts FROM problematic_events")
    acc.request_log.clear()
    if trigger == "a-day-later":
        db_rows_write(env, "UPDATE problematic_events SET last_seen_at = ?",
                      (tm.iso(tm.utc_now() - tm.RECOVERY_RECHECK - timedelta(minutes=1)),))
        code, _, err = cli(capsys, "sync", transport=transport)
    elif trigger == "force":
        code, _, err = cli(capsys, "sync", "--force", transport=transport)
    else:
        code, _, err = cli(capsys, "problematic", "retry", str(pid), transport=transport)
        assert code == 1 and "the next sync re-reads" in one_line(err)  # no tests mapped yet
        assert acc.request_log == []
        code, _, err = cli(capsys, "sync", transport=transport)
    assert code == 0, err
    reads = reads_of(acc.request_log, pid)
    assert {size: pages for size, pages in reads.items() if size != 100} == \
        {size: pages for size, pages in FULL_RECOVERY.items() if size != 100}
    # page 1 three times, then page 2; --force asked for pages 2 and 3 with page 1 (3 is past the end)
    assert sorted(reads[100]) == ([1, 1, 1, 2, 3] if trigger == "force" else [1, 1, 1, 2])
    assert db_rows(env, "SELECT attempts FROM problematic_events") == [(attempts + tm.MAX_RETRIES + 1,)]
    acc.request_log.clear()
    assert cli(capsys, "sync", transport=transport)[0] == 0  # confirmed again: cheap again
    assert reads_of(acc.request_log, pid) == {**AROUND, 100: [2]}


@pytest.mark.slow
@pytest.mark.parametrize("new_on_top", [1, 40])
def test_a_known_unreadable_position_that_moved_gets_the_full_recovery_and_no_test_is_skipped(
        env, capsys, new_on_top):
    acc, pid, bad = poisoned_at_30()
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    for k, test_id in enumerate(acc.add_tests(pid, new_on_top)):
        acc.move_test(test_id, NOW + timedelta(days=90, minutes=k))
    code, _, err = cli(capsys, "sync", transport=transport)
    assert code == 0 and "moved; recovering it in full" in err
    assert sorted(r[0] for r in db_rows(env, "SELECT id FROM tests WHERE product_id = ?", (pid,))) == \
        sorted(set(acc.test_ids(pid)) - {bad})
    assert db_rows(env, "SELECT offset_start FROM problematic_events") == [(30 + new_on_top,)]


def test_problematic_map_retry_and_clear_recover_a_poisoned_test_once_the_api_is_fixed(env, capsys):
    broken = make_account(products=2, tests_per_product=150, bugs_per_test=2)
    pid = broken.product_ids()[1]
    bad = broken.test_ids(pid)[42]
    broken.poison_test(bad)
    assert cli(capsys, "sync", transport=mock(broken.handler))[0] == 0
    code, out, err = cli(capsys, "problematic", "list")
    assert code == 0, err
    (event_id, _product, _page), = db_rows(env, "SELECT event_id, product_id, page FROM problematic_events")
    row = one_line(out.split("\n", 1)[1])
    assert row.split()[:4] == [event_id, str(pid), "1", "42-43"]
    before, after = broken.test_ids(pid)[41], broken.test_ids(pid)[43]
    assert f"{before} (" in row and f"{after} (" in row and row.endswith(" -")

    code, out, err = cli(capsys, "problematic", "retry", str(pid), transport=mock(broken.handler))
    assert code == 1 and "no tests are mapped for product" in one_line(err)
    code, out, err = cli(capsys, "problematic", "map-tests", event_id, str(bad))
    assert code == 0, err
    assert one_line(out) == (f"mapped 1 test(s) to event {event_id}; fetch them with "
                             f"`testio-mcp problematic retry PRODUCT_ID`")
    assert one_line(cli(capsys, "problematic", "list")[1].split("\n", 1)[1]).endswith(f" {bad}")

    code, out, err = cli(capsys, "problematic", "retry", str(pid), transport=mock(broken.handler))
    assert code == 1 and f"failed: {bad} (" in out  # still poisoned: nothing changes
    assert db_rows(env, "SELECT test_id FROM problematic_tests") == [(bad,)]

    fixed = make_account(products=2, tests_per_product=150, bugs_per_test=2)  # same data, no poison
    code, out, err = cli(capsys, "problematic", "retry", str(pid), transport=mock(fixed.handler))
    assert code == 0, err
    assert one_line(out) == "stored 1 test(s) with their bugs"
    assert_matches_truth(env, fixed)
    assert db_rows(env, "SELECT count(*) FROM problematic_tests") == [(0,)]
    assert cli(capsys, "problematic", "list")[1] == "no problematic events recorded\n"  # resolved

    assert cli(capsys, "sync", transport=mock(broken.handler))[0] == 0  # still broken server-side
    assert db_rows(env, "SELECT count(*) FROM problematic_events") == [(1,)]
    code, out, err = cli(capsys, "problematic", "clear")
    assert code == 1 and "add --yes" in one_line(err)
    assert db_rows(env, "SELECT count(*) FROM problematic_events") == [(1,)]
    code, out, err = cli(capsys, "problematic", "clear", "--yes")
    assert code == 0 and one_line(out) == "cleared 1 event(s)"
    assert cli(capsys, "problematic", "list")[1] == "no problematic events recorded\n"


###############################################################################
# Retry policy of the API client (exact: injected sleep and jitter)
###############################################################################

def client_for(handler, waits, rand=lambda: 0.5, **settings):
    async def sleep(seconds):
        waits.append(seconds)
    options = {"token": TOKEN, "base_url": BASE_URL, "retry_base": 0.5, **settings}
    return tm.TestioClient(tm.Settings(**options), transport=mock(handler), sleep=sleep, rand=rand)


def scripted(*outcomes):
    """A handler answering with the outcomes in order (then 200 {"products": []}); logs each request."""
    calls = []

    def handler(request):
        calls.append(request)
        outcome = outcomes[len(calls) - 1] if len(calls) <= len(outcomes) else 200
        if isinstance(outcome, type) and issubclass(outcome, Exception):
            raise outcome("injected", request=request)
        if isinstance(outcome, tuple):
            status, headers = outcome
            return httpx.Response(status, headers=headers, json={"error": "x"})
        if outcome == 200:
            return httpx.Response(200, json={"products": []})
        return httpx.Response(outcome, json={"error": "x"})

    handler.calls = calls
    return handler


async def get_products(client):
    try:
        return await client.get_products()
    finally:
        await client.aclose()


@pytest.mark.parametrize("seconds", ["7", "0", "2.5", "120"])  # 120 is the cap itself: still honoured
@pytest.mark.anyio
async def test_429_waits_exactly_the_retry_after_seconds(seconds):
    handler = scripted((429, {"Retry-After": seconds}), 200)
    waits = []
    assert await get_products(client_for(handler, waits)) == []
    assert len(handler.calls) == 2 and waits == [float(seconds)]


@pytest.mark.parametrize("offset", [30, 90, -30])
@pytest.mark.anyio
async def test_429_with_an_http_date_waits_until_that_moment(offset):
    target = math.ceil(time.time()) + offset
    handler = scripted((429, {"Retry-After": email.utils.formatdate(target, usegmt=True)}), 200)
    waits = []
    before = time.time()
    assert await get_products(client_for(handler, waits)) == []
    after = time.time()
    assert len(handler.calls) == 2 and len(waits) == 1
    assert max(0.0, target - after) <= waits[0] <= max(0.0, target - before)


@pytest.mark.parametrize("retry_after, shown", [("121", "121"), ("3600", "3600"), ("date+600", "(599|600|601)")])
@pytest.mark.anyio
async def test_retry_after_above_the_cap_fails_at_once_with_rate_limited_error(retry_after, shown):
    header = email.utils.formatdate(math.ceil(time.time()) + 600, usegmt=True) if retry_after.startswith("date") \
        else retry_after
    handler = scripted((429, {"Retry-After": header}))
    waits = []
    with pytest.raises(tm.RateLimitedError) as info:
        await get_products(client_for(handler, waits))
    assert len(handler.calls) == 1 and waits == []
    assert re.fullmatch(rf"GET products: rate limited, the API asks to wait {shown}s \(more than 120s\); "
                        rf"try again later", str(info.value))


@pytest.mark.anyio
async def test_429_without_retry_after_backs_off_and_gives_up_after_max_rate_limited():
    handler = scripted(*[429] * 20)
    waits = []
    with pytest.raises(tm.RateLimitedError) as info:
        await get_products(client_for(handler, waits, rand=lambda: 1.0))
    assert len(handler.calls) == tm.MAX_RATE_LIMITED + 1 == 7
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert "still rate limited after 7 tries" in str(info.value) and "MAX_CONCURRENT_API_REQUESTS" in str(info.value)


TRANSIENT = [500, 502, 503, 504, 520, 524, httpx.ReadTimeout, httpx.ConnectTimeout, httpx.ConnectError,
             httpx.RemoteProtocolError, httpx.ReadError]


@pytest.mark.parametrize("failure", TRANSIENT, ids=str)
@pytest.mark.anyio
async def test_transient_failures_retry_with_growing_jittered_delays_then_fail(failure):
    handler = scripted(*[failure] * 10)
    jitter = iter([0.0, 1.0, 0.5, 0.2, 0.9])
    waits = []
    with pytest.raises(tm.ServerError) as info:
        await get_products(client_for(handler, waits, rand=lambda: next(jitter)))
    assert len(handler.calls) == tm.MAX_RETRIES + 1 == 5
    # base 0.5 s doubling, each scaled into [50%, 100%] by the jitter draw
    assert waits == [0.5 * 0.5, 1.0 * 1.0, 2.0 * 0.75, 4.0 * 0.6]
    assert "after 5 attempts" in str(info.value)
    assert info.value.status == (failure if isinstance(failure, int) else None)


@pytest.mark.anyio
async def test_transient_failures_below_the_retry_limit_are_absorbed():
    handler = scripted(503, httpx.ReadTimeout, 524, httpx.RemoteProtocolError, 200)
    waits = []
    assert await get_products(client_for(handler, waits)) == []
    assert len(handler.calls) == 5 and len(waits) == 4


def test_backoff_is_capped_and_jittered_between_half_and_full_delay():
    delays = [tm.backoff_delay(n, 0.5, r) for n in range(12) for r in (0.0, 1.0)]
    assert max(delays) == tm.BACKOFF_CAP
    for n in range(12):
        full = min(tm.BACKOFF_CAP, 0.5 * 2 ** n)
        assert tm.backoff_delay(n, 0.5, 0.0) == full / 2 and tm.backoff_delay(n, 0.5, 1.0) == full


@pytest.mark.parametrize("status, error", [
    (400, tm.ApiError), (401, tm.AuthError), (403, tm.NotFoundError), (404, tm.NotFoundError),
    (405, tm.ApiError), (422, tm.ApiError),
])
@pytest.mark.anyio
async def test_client_errors_are_tried_exactly_once(status, error):
    handler = scripted(status, 200)
    waits = []
    with pytest.raises(error) as info:
        await get_products(client_for(handler, waits))
    assert type(info.value) is error and info.value.status == status
    assert len(handler.calls) == 1 and waits == []


def test_a_rejected_token_says_so_and_how_to_fix_it(env, capsys):
    acc = make_account(token="the-right-token")
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 1
    assert acc.request_log == ["/customer/v2/products"] and sum(acc.requests.values()) == 0  # asked once
    assert ("testio-mcp: sync failed: the TestIO API rejected the token (HTTP 401 on GET products): check "
            "TESTIO_CUSTOMER_API_TOKEN, or create a new token in TestIO under Integrations -> API") in err
    assert runs(env) == [("incremental", "failed")]


###############################################################################
# Bug batches: 524 splits down to single tests
###############################################################################

@pytest.mark.parametrize("cause", ["account-limit", "every-multi-test-batch"])
def test_bug_batches_answering_524_are_split_down_to_single_tests_and_every_bug_is_stored(env, capsys, cause):
    acc = make_account(products=2, tests_per_product=60, bugs_per_test=4)
    faults = Faults(acc.handler)
    if cause == "account-limit":
        biggest = max(len(acc.bug_ids(t)) for t in acc.test_ids())
        acc = make_account(products=2, tests_per_product=60, bugs_per_test=4, max_bugs_per_response=biggest)
        faults = Faults(acc.handler)
    else:
        faults.add(lambda r, n: httpx.Response(524, text="timeout")
                   if r.url.path.endswith("/bugs") and "," in r.url.params["filter_test_cycle_ids"] else None)
    statuses = collections.Counter()
    code, _, err = cli(capsys, "sync", transport=mock(status_code_counter(faults, statuses)))
    assert code == 0, err
    assert_matches_truth(env, acc)
    batches = [q.split("filter_test_cycle_ids=")[1].split("%2C") for q in faults.log if "/bugs?" in q]
    singles = {int(b[0]) for b in batches if len(b) == 1}
    assert statuses[524] > 0
    if cause == "every-multi-test-batch":  # every test whose bugs are due ends up asked for alone
        pre_run = {r[0] for r in db_rows(env, "SELECT id FROM tests WHERE status IN "
                                              "('initialized', 'customer_finalized', 'waiting')")}
        assert singles == set(acc.test_ids()) - pre_run
    else:
        assert singles
    assert runs(env) == [("incremental", "success")]


def test_bugs_of_a_test_that_always_fails_are_retried_by_the_next_sync(env, capsys):
    acc = make_account(products=1, tests_per_product=60, bugs_per_test=3)
    victim = next(t for t in acc.test_ids() if acc.bug_ids(t))
    faults = Faults(acc.handler).add(
        lambda r, n: httpx.Response(503) if r.url.path.endswith("/bugs")
        and str(victim) in r.url.params["filter_test_cycle_ids"].split(",") else None)
    code, _, err = cli(capsys, "sync", transport=mock(faults))
    assert code == 0, err
    assert runs(env) == [("incremental", "completed_with_problems")]
    assert f"bugs of test {victim} could not be fetched" in err
    assert db_rows(env, "SELECT bugs_synced_at FROM tests WHERE id = ?", (victim,)) == [(None,)]
    assert db_rows(env, "SELECT count(*) FROM bugs WHERE test_id = ?", (victim,)) == [(0,)]
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert_matches_truth(env, acc)
    assert runs(env)[-1] == ("incremental", "success")


def test_a_bug_batch_of_more_than_999_bugs_is_stored_by_a_sqlite_that_binds_at_most_999_variables(
        env, capsys, monkeypatch):
    """Older SQLite builds allow 999 variables a statement: no statement binds one per bug or feature."""
    connect = tm.connect

    def limited(path):
        conn = connect(path)
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        return conn

    monkeypatch.setattr(tm, "connect", limited)
    acc = make_account(products=1, tests_per_product=30, bugs_per_test=60)
    faults = Faults(acc.handler)
    assert cli(capsys, "sync", transport=mock(faults))[0] == 0
    batches = [[int(t) for t in entry.split("filter_test_cycle_ids=")[1].replace("%2C", ",").split(",")]
               for entry in faults.log if "filter_test_cycle_ids=" in entry]
    assert max(sum(len(acc.bug_ids(t)) for t in batch) for batch in batches) > 999
    assert_matches_truth(env, acc)
    pid = acc.product_ids()[0]
    acc.set_test_status(acc.test_ids(pid)[0], "locked")  # its bugs are replaced: the delete of vanished ones
    code, _, err = cli(capsys, "sync", "--force", transport=mock(acc.handler))
    assert code == 0, err
    assert_matches_truth(env, acc)


###############################################################################
# The token never leaks: outputs, log records, database files
###############################################################################

class RecordText(logging.Handler):
    """Every record of the module's and httpx's loggers, formatted with its traceback.

    (The CLI's logging.basicConfig(force=True) detaches pytest's caplog handler from the root logger, so
    records are collected on the named loggers instead.)"""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def records():
    handler = RecordText()
    loggers = [logging.getLogger(n) for n in ("testio_mcp", "httpx", "httpcore", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


LEAK_SCENARIOS = {
    "success": lambda acc: acc.handler,
    "rejected-401": lambda acc: make_account(products=1, tests_per_product=10, token="another").handler,
    "server-500": lambda acc: Faults(acc.handler).add(lambda r, n: httpx.Response(500, text="boom")),
    "timeouts": lambda acc: Faults(acc.handler).add(
        lambda r, n: httpx.ReadTimeout("timed out", request=r) if n % 2 else None),
    "resets": lambda acc: Faults(acc.handler).add(
        lambda r, n: httpx.RemoteProtocolError("Server disconnected", request=r) if n % 3 == 0 else None),
    "bug-batches-524": lambda acc: Faults(acc.handler).add(
        lambda r, n: httpx.Response(524) if r.url.path.endswith("/bugs") else None),
}


@pytest.mark.parametrize("scenario", LEAK_SCENARIOS)
def test_the_token_never_appears_in_output_logs_or_database_files(env, capsys, records, scenario):
    acc = make_account(products=2, tests_per_product=40, bugs_per_test=2)
    acc.poison_test(acc.test_ids()[5])
    handler = LEAK_SCENARIOS[scenario](acc)
    create_database(env)
    keep_open = sqlite3.connect(env)  # a second open connection keeps -wal and -shm on disk after the CLI
    keep_open.execute("SELECT count(*) FROM tests").fetchone()
    try:
        _code, out, err = cli(capsys, "sync", "--force", transport=mock(handler))
        cli(capsys, "sync", "--status")
        cli(capsys, "problematic", "list")
        files = {p.name: p.read_bytes() for p in env.parent.iterdir()}
    finally:
        keep_open.close()
    assert {"cache.db", "cache.db-wal", "cache.db-shm"} <= set(files)
    assert any(" DEBUG " in line or line.startswith("DEBUG") for line in err.splitlines())
    assert any("HTTP Request: GET" in line for line in records.lines)
    secret = TOKEN.encode()
    haystacks = {"stdout": out.encode(), "stderr": err.encode(), "log records": "\n".join(records.lines).encode(),
                 **files}
    assert [name for name, data in haystacks.items() if secret in data] == []
    assert [name for name, data in haystacks.items() if TOKEN[4:].encode() in data] == []  # nor a part of it


def test_a_log_record_carrying_either_secret_shows_it_masked_on_stderr(capsys):
    with restored_logging():
        tm.setup_logging("INFO", TOKEN, HTTP_TOKEN)
        logging.getLogger("uvicorn.error").warning("headers %s / %r", f"Bearer {HTTP_TOKEN}", {"token": TOKEN})
    err = capsys.readouterr().err
    assert "uvicorn.error: headers Bearer *** / {'token': '***'}" in err
    assert TOKEN not in err and HTTP_TOKEN not in err


###############################################################################
# Fault storm: a full sync under random 5xx/524, 429, resets and timeouts
###############################################################################

class Storm:
    """10% 5xx/524, 5% 429 (Retry-After: 0), 2% connection resets, 1% read timeouts."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.injected = collections.Counter()

    def __call__(self, request, n):
        u = self.rng.random()
        if u < 0.10:
            status = self.rng.choice([500, 502, 503, 504, 524])
            self.injected[str(status)] += 1
            return httpx.Response(status, text="storm")
        if u < 0.15:
            self.injected["429"] += 1
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "slow down"})
        if u < 0.17:
            kind = self.rng.choice([httpx.ConnectError, httpx.RemoteProtocolError])
            self.injected[kind.__name__] += 1
            return kind("storm", request=request)
        if u < 0.18:
            self.injected["ReadTimeout"] += 1
            return httpx.ReadTimeout("storm", request=request)
        return None


STORM_SEEDS = range(1, 21)


@pytest.mark.slow
def test_a_sync_under_a_fault_storm_reports_success_only_when_local_data_equals_truth(env, capsys, monkeypatch):
    """For each seed: every run that reports success has stored exactly the truth; a run that reports
    problems is honest about it, and the next run (same storm) converges."""
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    totals, statuses = collections.Counter(), collections.Counter()
    for seed in STORM_SEEDS:
        for path in env.parent.glob("cache.db*"):
            path.unlink()
        acc = make_account(seed=seed, products=2, tests_per_product=80, bugs_per_test=1)
        storm = Storm(seed)
        transport = mock(Faults(acc.handler).add(storm))
        for attempt in range(1, 4):
            code, _, err = cli(capsys, "sync", transport=transport)
            status = runs(env)[-1][1]
            statuses[status] += 1
            assert code in (0, 1) and "Traceback" not in err
            if status == "success":
                assert code == 0
                assert_matches_truth(env, acc)
                break
            assert status in ("completed_with_problems", "failed")
            assert db_rows(env, "SELECT error IS NOT NULL OR problems > 0 FROM sync_runs "
                                "ORDER BY id DESC LIMIT 1") == [(1,)], f"seed {seed}: dishonest {status}"
        else:
            pytest.fail(f"seed {seed}: three syncs under the storm never converged")
        totals.update(storm.injected)
    print(f"storm: {len(STORM_SEEDS)} seeds, faults injected {dict(totals)}, runs {dict(statuses)}")
    assert set(totals) == {"500", "502", "503", "504", "524", "429", "ConnectError", "RemoteProtocolError",
                           "ReadTimeout"}


###############################################################################
# Hung API, page drift, malformed answers
###############################################################################

@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers; yields (url, accepted list)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/customer/v2", accepted
    stop.set()
    thread.join(WAIT)
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.mark.slow
def test_a_hung_api_fails_each_request_within_its_timeout_and_the_sync_ends_with_a_clear_error(
        env, capsys, monkeypatch, silent_server):
    url, accepted = silent_server
    monkeypatch.setenv("TESTIO_CUSTOMER_API_BASE_URL", url)
    monkeypatch.setenv("TESTIO_HTTP_TIMEOUT_SECONDS", "0.5")
    started = time.monotonic()
    code, _, err = cli(capsys, "sync")
    elapsed = time.monotonic() - started
    assert code == 1
    reason = (f"GET products: read timeout (0.5s) after 5 attempts from {url}; check the network, or "
              f"TESTIO_CUSTOMER_API_BASE_URL if that is not the API's address")
    assert f"testio-mcp: sync failed: {reason}" in err
    assert 5 * 0.5 <= elapsed < 5 * 0.5 + 5.0
    assert len(accepted) >= 1
    assert db_rows(env, "SELECT status, error FROM sync_runs") == [("failed", reason)]


def assert_end_at_matches(db_path, acc):
    stored = dict(db_rows(db_path, "SELECT id, end_at FROM tests"))
    assert stored == {t: tm.to_utc(acc.test_json(t)["end_at"]) for t in acc.test_ids()}


@pytest.mark.slow
@pytest.mark.parametrize("when", ["cold", "warm"])
def test_page_drift_while_paging_is_absorbed_by_the_next_sync(env, capsys, when):
    acc = make_account(products=1, tests_per_product=250, bugs_per_test=2)
    pid = acc.product_ids()[0]
    if when == "warm":
        assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
    order = acc.test_ids(pid)
    changed = next(t for t in order[:60] if acc.test_json(t)["status"] == "locked")
    moved = order[220]
    drift = {}

    def drift_on_page_2(request, n):
        if request.url.params.get("page") == "2" and not drift:
            drift["new"] = acc.add_tests(pid, 7)           # new tests at the head shift every page down
            acc.set_test_status(changed, "archived")        # a test already read changes status
            acc.move_test(moved, NOW + timedelta(days=40))  # a test not yet read jumps to the top

    code, _, err = cli(capsys, "sync", transport=mock(Faults(acc.handler).add(drift_on_page_2)))
    assert code == 0, err
    assert drift and len(drift["new"]) == 7
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert_matches_truth(env, acc)
    assert_end_at_matches(env, acc)
    stored = dict(db_rows(env, "SELECT id, status FROM bugs WHERE test_id = ?", (changed,)))
    assert stored == {b["id"]: tm.bug_status(b) for b in acc.bugs_of(changed)}


@pytest.mark.slow
def test_a_sync_keeps_at_most_two_bug_batches_per_request_slot_waiting_to_be_stored(env, capsys, monkeypatch):
    monkeypatch.setenv("MAX_CONCURRENT_API_REQUESTS", "2")
    acc = make_account(products=1, tests_per_product=500, bugs_per_test=8)
    recorded = {}

    def record(request):
        response = acc.handler(request)
        recorded[str(request.url)] = response.content
        return response

    monkeypatch.setenv("TESTIO_DB_PATH", str(env.parent / "first.db"))
    assert cli(capsys, "sync", transport=mock(record))[0] == 0
    monkeypatch.setenv("TESTIO_DB_PATH", str(env))
    pre_run = "','".join(tm.PRE_RUN_STATUSES)
    ahead = []  # per bug request: batches requested (this one included) minus batches stored

    def instant(request):  # answers at once (recorded), so storing is the slow side
        if request.url.path.endswith("/bugs"):
            stored = db_rows(env, "SELECT count(*) FROM tests WHERE bugs_synced_at IS NOT NULL "
                                  f"AND status NOT IN ('{pre_run}')")[0][0]
            ahead.append(len(ahead) + 1 - stored // tm.BUG_BATCH_TESTS)
        content = recorded.get(str(request.url))
        return httpx.Response(200, content=content) if content is not None else acc.handler(request)

    assert cli(capsys, "sync", transport=mock(instant))[0] == 0
    assert_matches_truth(env, acc)
    assert len(ahead) >= 15
    assert max(ahead) <= tm.UNSTORED_BATCHES_PER_SLOT * 2, ahead


@pytest.fixture
def large_batches(env, monkeypatch):
    """An account whose bug batches are large (~2,500 bugs), and every answer a cold sync of it reads
    (URL -> body), recorded by a sync into a scratch database: replaying them costs the fake nothing,
    so what the event loop spends is the sync's own."""
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    acc = make_account(products=1, tests_per_product=75, bugs_per_test=100, max_bugs_per_response=10_000)
    answers = {}

    def record(request):
        response = acc.handler(request)
        answers[str(request.url)] = response.content
        return response

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESTIO_DB_PATH", str(env.parent / "recording.db"))
        assert tm.main(["sync"], transport=mock(record)) == 0
    return acc, answers


@pytest.mark.slow
def test_the_event_loop_stays_free_while_a_sync_decodes_and_stores_large_bug_batches(env, capsys, large_batches):
    acc, answers = large_batches
    batches = [body.decode() for url, body in answers.items() if "/bugs?" in url]
    assert len(batches) == 3
    # CPU time of the loop's thread, not wall time: what a loaded machine adds (waiting for a core
    # or the GIL) is no work of the loop's, and would make the figures noise
    stretches, probing, decode = [], [], []

    async def probe():  # wakes every 2 ms and notes the CPU the loop's thread spent in between
        while True:
            cpu = time.thread_time()
            await asyncio.sleep(0.002)
            stretches.append(time.thread_time() - cpu)

    async def replay(request):  # runs on the sync's event loop: the first request starts the probe there
        if not probing:
            probing.append(asyncio.create_task(probe()))
        return httpx.Response(200, content=answers[str(request.url)])

    # pytest's process holds far more objects than a sync's: a full collection of them would be what
    # the probe sees, so they are frozen out of the cyclic GC meanwhile
    gc.freeze()
    try:
        for text in batches:  # the reference: the CPU decoding each batch takes in this process
            cpu = time.thread_time()
            tm.loads_keeping_raw(text, "bugs")
            decode.append(time.thread_time() - cpu)
        code, _, err = cli(capsys, "sync", transport=mock(replay))
    finally:
        gc.unfreeze()
    assert code == 0, err
    assert_matches_truth(env, acc)
    assert len(stretches) > 50
    # a batch decoded on the loop would keep it busy for a whole decoding between two wakeups, three
    # times; one long stretch (a cyclic collection of the sync's own objects) is no decoding
    longest = sorted(stretches)[-2]
    assert longest < min(decode) / 3, (
        f"the loop worked {longest * 1000:.1f} ms of CPU twice without a break; decoding one bug batch "
        f"takes {min(decode) * 1000:.1f} ms")


def thread_cpu(prefix: str) -> float:
    """CPU seconds spent so far by this process's live threads whose name starts with `prefix`."""
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threading.enumerate()
               if t.name.startswith(prefix) and t.ident is not None)


@pytest.mark.slow
@pytest.mark.anyio
async def test_tool_calls_during_a_sync_hold_back_its_writer(env, monkeypatch, large_batches):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    acc, answers = large_batches
    answered = asyncio.Event()

    async def replay(request):  # recorded: the writer, decoding and storing large batches, is the slow side
        if "/bugs" in request.url.path:
            answered.set()
        return httpx.Response(200, content=answers[str(request.url)])

    # per call: its wall time and the CPU the writer thread spent meanwhile (CPU, not wall time: a
    # loaded machine stretches both sides alike)
    calls, writer = [], []
    gc.freeze()  # pytest's many objects out of the cyclic GC, as the event-loop test does
    try:
        with anyio.fail_after(WAIT):
            async with mcp_client(replay) as client:
                await answered.wait()  # from here on the writer has bug batches to decode and store
                for tool in ("get_database_stats", "list_products") * 150:
                    cpu, started = thread_cpu("testio-db-write"), time.perf_counter()
                    result = await client.call_tool(tool, {})
                    calls.append(time.perf_counter() - started)
                    writer.append(thread_cpu("testio-db-write") - cpu)
                    assert result.is_error is False
                    if result.structured_content.get("sync") is None:  # the first sync has ended
                        break
                run = (await ok(client, "sync_data"))["run"]  # waits for the first sync (and holds no writer)
    finally:
        gc.unfreeze()
    assert run["status"] == "success"
    assert_matches_truth(env, acc)
    assert len(calls) > 20
    # left alone, the writer works through the calls, over half their time (it shares the GIL with
    # the loop serving them); held back, it finishes the few rows it is on when a call starts and, as
    # calls never stop here, works WRITER_SLICE_S after each WRITER_PAUSE_S wait: about a sixth of the
    # time, a quarter with the rows it finishes after each slice (a loaded machine lowers both figures)
    share = sum(writer) / sum(calls)
    assert share < 0.4, f"the writer worked {share:.0%} of the time tool calls were in flight"


@pytest.mark.anyio
async def test_a_large_test_page_is_decoded_letting_other_threads_take_the_gil_between_its_tests():
    page = {"exploratory_tests": [{"id": i, "title": f"test {i}", "status": "archived",
                                   "goal": "check the checkout " * 40, "devices": [{"os": "ios"}] * 10}
                                  for i in range(1, 8001)]}
    body = json.dumps(page).encode()
    # pytest's process holds far more objects than a server's: a full collection of them would be
    # what the probe sees, so they are frozen out of the cyclic GC meanwhile
    gc.freeze()
    cpu = time.thread_time()
    assert json.loads(body) == page
    whole = time.thread_time() - cpu  # one json.loads: the GIL is kept that long
    # CPU of the decoding thread between two wakeups of a thread that asks for the GIL every 0.5 ms
    # (CPU, not wall time: a loaded machine stretches wall time on both sides)
    stretches, stop = [], threading.Event()

    def probe():
        last = thread_cpu("testio-decode")
        while not stop.is_set():
            time.sleep(0.0005)
            now = thread_cpu("testio-decode")
            stretches.append(now - last)
            last = now

    client = client_for(lambda request: httpx.Response(200, content=body), [])
    thread = threading.Thread(target=probe)
    thread.start()
    try:
        with anyio.fail_after(WAIT):
            tests = await client.get_tests_page(P, 1, 8000)
    finally:
        stop.set()
        thread.join(WAIT)
        gc.unfreeze()
        await client.aclose()
    assert tests == page["exploratory_tests"]
    assert max(stretches) < whole / 2, (
        f"the decoding thread worked {max(stretches) * 1000:.1f} ms of CPU while another thread waited for "
        f"the GIL; decoding the whole page at once takes {whole * 1000:.1f} ms")


@pytest.mark.anyio
async def test_a_server_shortens_the_gil_switch_interval_while_its_sync_runs_and_restores_it(db):
    acc = make_account()
    during = set()

    def handler(request):  # answered on the server's event loop, while its sync runs
        during.add(sys.getswitchinterval())
        return acc.handler(request)

    before = sys.getswitchinterval()
    async with mcp_client(handler) as client:
        await ok(client, "sync_data", {})
        after = sys.getswitchinterval()
    assert max(during) < before == after
    assert during == {tm.SYNC_SWITCH_INTERVAL_S}


MALFORMED = {  # (target, name) -> body answered with HTTP 200
    **{(target, "not-json"): b"{not json" for target in ("page", "bug-batch")},
    **{(target, "html"): b"<html><body>maintenance</body></html>" for target in ("page", "bug-batch")},
    **{(target, "top-level-list"): b"[]" for target in ("page", "bug-batch")},
    **{(target, "wrong-key"): b'{"data": []}' for target in ("page", "bug-batch")},
    ("page", "null-list"): b'{"exploratory_tests": null}',
    ("bug-batch", "null-list"): b'{"bugs": null}',
    ("page", "object-for-list"): b'{"exploratory_tests": {"id": 1, "title": "x"}}',
    ("bug-batch", "object-for-list"): b'{"bugs": {"id": 1, "test": {"id": 1}}}',
    ("page", "item-without-id"): b'{"exploratory_tests": [{"title": "x"}]}',
    ("bug-batch", "item-without-id"): b'{"bugs": [{"title": "x"}]}',
    ("page", "string-id"): b'{"exploratory_tests": [{"id": "7"}]}',
    ("bug-batch", "string-id"): b'{"bugs": [{"id": "7"}]}',
    ("bug-batch", "bug-without-test"): b'{"bugs": [{"id": 7, "title": "orphan"}]}',
    ("bug-batch", "truncated"): b'{"bugs": [{"id": 7, "test": {"id": 1}}',
    ("bug-batch", "trailing-comma"): b'{"bugs": [{"id": 7, "test": {"id": 1}},]}',
    ("bug-batch", "extra-data"): b'{"bugs": []} {"bugs": []}',
    ("bug-batch", "not-utf8"): b'{"bugs": [{"id": 7, "title": "\xff", "test": {"id": 1}}]}',
}


def snapshot(db_path):
    return (db_rows(db_path, "SELECT id, product_id, title, status, end_at, raw FROM tests ORDER BY id"),
            db_rows(db_path, "SELECT * FROM bugs ORDER BY id"),
            db_rows(db_path, "SELECT id, product_id, title, description, howtofind, user_stories, section_ids "
                             "FROM features ORDER BY id"))


@pytest.mark.slow
@pytest.mark.parametrize("target, body", MALFORMED, ids=[f"{t}-{b}" for t, b in MALFORMED])
def test_a_malformed_page_or_bug_batch_fails_with_a_logged_error_and_keeps_stored_data(env, capsys, target, body):
    acc = make_account(products=2, tests_per_product=30, bugs_per_test=2)
    pid = acc.product_ids()[0]
    victim = next(t for t in acc.test_ids(pid)[10:] if acc.bug_ids(t))
    acc.set_test_status(victim, "locked")  # non-final: --refresh asks for its bugs again
    assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
    good = snapshot(env)
    content = MALFORMED[target, body]
    ctype = "text/html" if content.startswith(b"<") else "application/json"

    def malformed(request, n):
        if target == "page":
            hit = request.url.path.endswith(f"/products/{pid}/exploratory_tests")
        else:
            hit = request.url.path.endswith("/bugs") and \
                str(victim) in request.url.params["filter_test_cycle_ids"].split(",")
        return httpx.Response(200, content=content, headers={"content-type": ctype}) if hit else None

    code, _, err = cli(capsys, "sync", "--refresh", transport=mock(Faults(acc.handler).add(malformed)))
    assert "Traceback" not in err
    if target == "page":
        assert code == 1
        assert re.search(rf"ERROR testio_mcp: sync of product {pid} failed: GET products/{pid}/exploratory_tests",
                         err), err
        assert runs(env)[-1] == ("refresh", "completed_with_problems")
    else:
        assert code == 0, err
        assert re.search(rf"ERROR testio_mcp: bugs of test {victim} could not be fetched: GET bugs", err), err
        assert runs(env)[-1] == ("refresh", "completed_with_problems")
    assert snapshot(env) == good
    assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
    assert_matches_truth(env, acc)


def test_a_bug_is_stored_as_the_json_text_the_api_sent_not_a_second_encoding(env, capsys):
    acc = make_account(products=1, tests_per_product=8, bugs_per_test=3)

    def indented(request, n):  # the same bugs, laid out differently than json.dumps would
        if request.url.path.endswith("/bugs"):
            body = json.loads(acc.handler(request).content)
            body["bugs"] = [{**b, "title": b["title"] + " ünïcødé ✓"} for b in body["bugs"]]
            return httpx.Response(200, content=json.dumps({"meta": {"n": 1}, **body}, indent=1,
                                                          ensure_ascii=False).encode())
        return None

    assert cli(capsys, "sync", transport=mock(Faults(acc.handler).add(indented)))[0] == 0
    stored = db_rows(env, "SELECT id, test_id, title, raw FROM bugs ORDER BY id")
    assert len(stored) == len(acc.bug_ids()) > 0
    for bug_id, test_id, title, raw in stored:
        served = next(b for b in acc.bugs_of(test_id) if b["id"] == bug_id)
        assert json.loads(raw) == {**served, "title": served["title"] + " ünïcødé ✓"} and title.endswith("✓")
        assert raw.startswith("{\n") and "ünïcødé ✓" in raw  # the served text itself


###############################################################################
# Crashes and locks: kill -9 mid-sync, two syncs at once, disk full
###############################################################################

@pytest.mark.slow
@pytest.mark.parametrize("failing_page, resumed_pages", [
    (2, [1, 2, 3, 4, 5, 6]),
    (3, [1, 2, 3, 4, 5, 6]),
    (4, [1, 2, 3, 4, 5, 6]),
    # pages 1-3 by the incremental rule, then from the checkpoint (one page overlap) in full, reading
    # READ_AHEAD_PAGES at once: page 6 is past the short page 5
    (5, [1, 2, 3, 4, 5, 6]),
])
def test_an_interrupted_walk_is_resumed_from_its_checkpoint_to_the_end(env, capsys, failing_page, resumed_pages):
    acc = deep_account()
    pid = acc.product_ids()[0]
    faults = Faults(acc.handler).add(
        lambda r, n: httpx.Response(503) if r.url.params.get("page") == str(failing_page) else None)
    code, _, err = cli(capsys, "sync", transport=mock(faults))
    assert code == 1 and "HTTP 503 after" in err
    assert db_rows(env, "SELECT walk_mode, walk_next_page FROM product_sync") == [("full", failing_page)]
    assert db_rows(env, "SELECT count(*) FROM tests") == [((failing_page - 1) * 100,)]
    acc.request_log.clear()
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert pages_read(acc.request_log, pid) == resumed_pages
    assert_matches_truth(env, acc)
    assert db_rows(env, "SELECT walk_mode, walk_next_page, last_status FROM product_sync") == [(None, None, "success")]


def wait_for(event, proc, timeout=WAIT):
    """Wait until `event` is set or `proc` has exited (bounded); True if the event came first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event.wait(0.02):
            return True
        if proc.poll() is not None:
            return event.is_set()
    raise AssertionError(f"neither the event nor the exit of pid {proc.pid} within {timeout}s")


KILLS = 20


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_sound_database_and_the_next_sync_converges(env, capsys, loopback,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    acc = make_account(products=1, tests_per_product=310, bugs_per_test=0.3)  # 4 pages: resume matters
    rng = random.Random(20261127)
    kills, rounds, interrupted, moments = 0, 0, 0, []
    while kills < KILLS:
        rounds += 1
        assert rounds <= 2 * KILLS, f"only {kills} kills landed in {rounds - 1} rounds"
        how = rng.choice(["cold", "cold", "force", "warm"])
        if how == "cold":
            for path in env.parent.glob("cache.db*"):
                path.unlink()
        elif how == "warm":
            pid = rng.choice(acc.product_ids())
            acc.add_tests(pid, rng.randint(1, 30))
            acc.set_test_status(acc.test_ids(pid)[rng.randint(0, 40)], rng.choice(["locked", "archived"]))
        n = rng.randint(1, 15 if how == "cold" else 5)  # a cold sync makes 19-21 requests, the others ~8
        last_run = db_rows(env, "SELECT max(id) FROM sync_runs")[0][0] if env.exists() else None
        server = loopback(acc.handler)
        server.pause_after = n
        proc = spawn_sync(tmp_path, server.base_url, *(["--force"] if how == "force" else []))
        if wait_for(server.reached, proc):
            proc.kill()
        code, _, err = finish(proc, tmp_path)
        server.release.set()
        assert code in (0, -signal.SIGKILL), err
        killed = code == -signal.SIGKILL  # 0: the sync had ended before request n, or before the signal
        if killed:
            kills += 1
            moments.append((how, n))
        assert "Traceback" not in err
        assert db_rows(env, "PRAGMA integrity_check") == [("ok",)]
        assert db_rows(env, "PRAGMA foreign_key_check") == []
        code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
        assert code == 0, err
        assert_matches_truth(env, acc)
        # the history is honest: the killed run (it had asked the API, so it was recorded) is 'interrupted',
        # unless it had finished before the signal landed; nothing is left 'running'
        (killed_run,), (converged,) = db_rows(env, "SELECT status FROM sync_runs WHERE id > ? ORDER BY id",
                                                (last_run or 0,))
        assert killed_run in (("interrupted", "success") if killed else ("success",))
        assert converged == "success"
        interrupted += killed_run == "interrupted"
        assert db_rows(env, "SELECT walk_mode FROM product_sync WHERE walk_mode IS NOT NULL") == []
    print(f"kill -9: {kills} kills ({interrupted} mid-run) in {rounds} rounds at (mode, after request n) {moments}")


@pytest.mark.slow
def test_two_syncs_at_once_one_runs_and_the_other_waits_its_lock_timeout_then_exits(env, capsys, loopback,
                                                                                    tmp_path):
    acc = make_account(products=1, tests_per_product=50, bugs_per_test=1)
    server = loopback(acc.handler)
    server.pause_after = 1  # the running sync holds the lock, its run recorded, waiting on its 2nd request
    first = spawn_sync(tmp_path, server.base_url, name="first")
    assert wait_for(server.reached, first)
    second = Faults(acc.handler)
    started = time.monotonic()
    code, out, err = cli(capsys, "sync", "--lock-timeout", "0.5", transport=mock(second))
    waited = time.monotonic() - started
    assert code == 1
    assert one_line(err) == (f"testio-mcp: another sync is running on {env} (waited 0.5s); "
                             f"try again when it ends")
    assert 0.5 <= waited < 0.5 + 10
    assert second.calls == 0
    assert db_rows(env, "SELECT status FROM sync_runs ORDER BY id") == [("running",), ("skipped",)]
    server.release.set()
    code, out, err = finish(first, tmp_path, "first")
    assert code == 0, err
    assert_matches_truth(env, acc)
    assert db_rows(env, "SELECT mode, status, error FROM sync_runs ORDER BY id") == [
        ("incremental", "success", None),
        ("incremental", "skipped", f"another sync is running on {env} (waited 0.5s); try again when it ends")]
    code, out, err = cli(capsys, "sync", "--status")
    assert re.search(r"^1\s+incremental\s+cli\s+\S+\s+success\s+50\s", out, re.MULTILINE), out
    assert re.search(r"^2\s+incremental\s+cli\s+\S+\s+skipped\s+0\s+0\s+0\s+0\s+another sync is running", out, re.MULTILINE)


def limit_file_size(limit):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing the process
    return preexec


@pytest.mark.slow
@pytest.mark.parametrize("limit", [48 * 1024, 600 * 1024, 1500 * 1024], ids=["48KiB", "600KiB", "1500KiB"])
def test_disk_full_mid_sync_fails_with_one_readable_line_and_the_next_sync_converges(env, capsys, loopback,
                                                                                     tmp_path, limit):
    acc = make_account(products=2, tests_per_product=150, bugs_per_test=3)
    server = loopback(acc.handler)
    proc = spawn_sync(tmp_path, server.base_url, preexec_fn=limit_file_size(limit))
    code, _, err = finish(proc, tmp_path)
    assert code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    # EFBIG from the rlimit surfaces as SQLITE_IOERR ("disk I/O error"); a real full disk as SQLITE_FULL
    assert re.fullmatch(r"testio-mcp: (sync failed: )?(database or disk is full|disk I/O error)", last), err
    assert max(p.stat().st_size for p in env.parent.iterdir()) <= limit
    assert db_rows(env, "PRAGMA integrity_check") == [("ok",)]
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert_matches_truth(env, acc)


def test_an_error_sqlite_already_rolled_back_is_reported_as_itself_not_as_a_failed_rollback(
        env, capsys, lean_account):
    """SQLITE_FULL and IOERR can roll the transaction back inside SQLite; a trigger's RAISE(ROLLBACK)
    does the same on demand."""
    transport = mock(lean_account.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    conn = sqlite3.connect(env)
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON products BEGIN SELECT RAISE(ROLLBACK, 'disk says no'); END")
    conn.close()
    code, _, err = cli(capsys, "sync", transport=transport)
    assert code == 1
    assert err.strip().splitlines()[-1] == "testio-mcp: sync failed: disk says no", err
    assert db_rows(env, "SELECT status, error FROM sync_runs ORDER BY id DESC LIMIT 1") == [("failed", "disk says no")]


def test_a_failed_commit_leaves_the_writer_outside_any_transaction(env, capsys, lean_account):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    conn = sqlite3.connect(env)  # a deferred foreign key is checked by COMMIT: a COMMIT that fails on demand
    conn.execute("CREATE TABLE notes (test_id INTEGER REFERENCES tests(id) DEFERRABLE INITIALLY DEFERRED)")
    conn.close()

    async def writes():
        db = await tm.Database(env).open()
        try:
            with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY constraint failed"):
                await db.write(lambda conn: conn.execute("INSERT INTO notes VALUES (-1)"))
            assert await db.write(tm.clear_problems) == 0  # the one writer connection still writes
        finally:
            await db.aclose()

    asyncio.run(writes())
    assert db_rows(env, "SELECT count(*) FROM notes") == [(0,)]


###############################################################################
# Damaged cache files: moved aside, replaced by a fresh one the sync fills, the user told once
###############################################################################

DAMAGE = ("header", "schema-page", "data-pages", "truncated", "not-sqlite")
DAMAGE_REASON = r"(file is not a database|database disk image is malformed)"


def damage(path: Path, where: str) -> None:
    """Spoil a (checkpointed) database file the way disks, copies and people do ("tests-and-bugs": the
    root pages of those two tables only, the others stay readable)."""
    only = " AND name IN ('tests', 'bugs')" if where == "tests-and-bugs" else ""
    roots = [r for (r,) in db_rows(path, f"SELECT rootpage FROM sqlite_master WHERE rootpage > 1{only}")]
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    if where == "header":
        data[:16] = b"Not SQLite, sorry"[:16]
    elif where == "schema-page":
        data[100:page] = b"\xff" * (page - 100)
    elif where in ("data-pages", "tests-and-bugs"):  # root pages of tables and indexes: the schema reads
        for root in roots:
            data[(root - 1) * page:root * page] = b"\xff" * page
    elif where == "truncated":
        del data[len(data) // 2:]
    else:
        data = bytearray(b"my notes, not a database\n" * 400)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def small_synced(tmp_path_factory):
    """A small account synced once: (its database, the account)."""
    root = tmp_path_factory.mktemp("small")
    acc = make_account(products=2, tests_per_product=40, bugs_per_test=2)
    with pytest.MonkeyPatch.context() as mp:
        path = clean_environment(mp, root)
        with restored_logging():
            assert tm.main(["sync"], transport=transport_for(acc.handler)) == 0
    return path, acc


def damaged_copy(small_synced, env, where):
    env.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(small_synced[0], env)
    damage(env, where)


def assert_told_once(err, env):
    """One WARNING naming the damage, the file and where it went; returns the moved-aside file."""
    [aside] = env.parent.glob(f"{env.name}.damaged-*[0-9]Z")
    assert "Traceback" not in err
    told = re.findall(rf"WARNING +testio_mcp:(?:\S+)? the local cache {re.escape(str(env))} was damaged "
                      rf"\({DAMAGE_REASON}\): moved it to {re.escape(str(aside))} and started a fresh one", err)
    assert len(told) == 1, err
    return aside


@pytest.mark.slow
@pytest.mark.parametrize("where", DAMAGE)
def test_sync_on_a_damaged_cache_moves_it_aside_and_fills_a_fresh_one(env, capsys, small_synced, where):
    damaged_copy(small_synced, env, where)
    spoiled = len(env.read_bytes())
    code, _, err = cli(capsys, "sync", transport=mock(small_synced[1].handler))
    assert code == 0, err
    aside = assert_told_once(err, env)
    assert aside.stat().st_size >= spoiled * 0.5
    assert_matches_truth(env, small_synced[1])
    assert runs(env) == [("incremental", "success")]


@pytest.mark.parametrize("where", DAMAGE)
@pytest.mark.parametrize("argv, shown", [(["sync", "--status"], "last good  never"),
                                         (["problematic", "list"], "no problematic events recorded"),
                                         (["problematic", "clear", "--yes"], "cleared 0 event(s)")],
                         ids=["status", "problematic-list", "problematic-clear"])
def test_every_command_on_a_damaged_cache_answers_from_a_fresh_one_and_says_where_the_old_one_is(
        env, capsys, small_synced, where, argv, shown):
    damaged_copy(small_synced, env, where)
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert_told_once(err, env)
    assert shown in out
    assert db_rows(env, "SELECT count(*) FROM tests") == [(0,)]
    assert db_rows(env, "PRAGMA integrity_check") == [("ok",)]


def test_hand_entered_problematic_mappings_outlive_a_damaged_cache_when_still_readable(env, capsys, small_synced):
    env.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(small_synced[0], env)
    pid = small_synced[1].product_ids()[0]
    conn = sqlite3.connect(env)
    with conn:
        conn.execute("INSERT INTO problematic_events (event_id, product_id, page, per_page, offset_start, "
                     "offset_end, attempts, first_seen_at, last_seen_at) VALUES ('e1', ?, 3, 100, 250, 251, 5, "
                     "'2020-01-01T00:00:00Z', '2020-01-02T00:00:00Z')", (pid,))
        conn.execute("INSERT INTO problematic_tests VALUES ('e1', 4242, '2020-01-03T00:00:00Z')")
    conn.close()
    mapped = every_row(env)
    damage(env, "tests-and-bugs")
    code, _, err = cli(capsys, "sync", transport=mock(small_synced[1].handler))
    assert code == 0, err
    assert_told_once(err, env)
    assert_matches_truth(env, small_synced[1])
    for table in ("problematic_events", "problematic_tests"):
        assert every_row(env)[table] == mapped[table]
    code, out, _ = cli(capsys, "problematic", "list")
    assert code == 0 and re.search(r"e1 .* 4242", out), out


###############################################################################
# Schema: idempotent DDL, newer databases refused, older ones migrated in place
###############################################################################

def test_schema_sql_applies_twice_cleanly(tmp_path):
    conn = sqlite3.connect(tmp_path / "twice.db")
    schema = (HERE / "schema.sql").read_text()
    conn.executescript(schema)
    first = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    conn.executescript(schema)
    assert conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall() == first
    assert {"products", "features", "tests", "test_features", "bugs", "sync_runs", "product_sync",
            "problematic_events", "problematic_tests", "search_fts", "changes"} <= {n for t, n, _ in first if t == "table"}
    conn.close()


@pytest.mark.parametrize("argv", [["sync", "--status"], ["sync"], ["problematic", "list"]])
def test_a_database_from_a_newer_version_is_refused_with_a_clear_message(env, capsys, lean_account, argv):
    env.parent.mkdir()
    conn = sqlite3.connect(env)
    conn.execute(f"PRAGMA user_version = {tm.SCHEMA_VERSION + 1}")
    conn.close()
    code, _, err = cli(capsys, *argv, transport=mock(lean_account.handler))
    assert code == 1
    assert one_line(err) == (f"testio-mcp: the database was written by a newer testio-mcp (schema "
                             f"{tm.SCHEMA_VERSION + 1}, this one knows {tm.SCHEMA_VERSION}); upgrade testio-mcp "
                             f"or point TESTIO_DB_PATH elsewhere")
    assert db_rows(env, "PRAGMA user_version") == [(tm.SCHEMA_VERSION + 1,)]
    assert db_rows(env, "SELECT count(*) FROM sqlite_master") == [(0,)]
    assert sum(lean_account.requests.values()) == 0


def test_a_version_1_database_is_migrated_in_place_and_full_text_rows_come_back(env, capsys, lean_account):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    counts = {t: db_rows(env, f"SELECT count(*) FROM {t}")[0][0] for t in ("products", "features", "tests", "bugs")}
    conn = sqlite3.connect(env)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%fts%'")\
            .fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE search_fts")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    assert db_rows(env, "SELECT count(*) FROM sqlite_master WHERE name LIKE '%fts%'") == [(0,)]
    code, _, err = cli(capsys, "sync", "--status")
    assert code == 0, err
    assert db_rows(env, "PRAGMA user_version") == [(tm.SCHEMA_VERSION,)] and tm.SCHEMA_VERSION == 9
    assert {t: db_rows(env, f"SELECT count(*) FROM {t}")[0][0] for t in counts} == counts
    assert dict(db_rows(env, "SELECT entity, count(*) FROM search_fts GROUP BY entity")) == {
        "product": counts["products"], "feature": counts["features"], "test": counts["tests"],
        "bug": counts["bugs"]}
    test_id, title = db_rows(env, "SELECT id, title FROM tests ORDER BY id LIMIT 1")[0]
    hits = db_rows(env, "SELECT rowid & 1099511627775 FROM search_fts WHERE search_fts MATCH ? AND entity = 'test'",
                   (tm.fts_query(title),))
    assert (test_id,) in hits
    assert db_rows(env, "PRAGMA integrity_check") == [("ok",)]


def test_a_version_2_database_loses_its_per_row_index_triggers_and_gets_the_covering_indexes(
        env, capsys, lean_account):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    conn = sqlite3.connect(env)  # what version 2 had: per-row FTS triggers on tests and bugs, narrow indexes
    conn.executescript("""
        CREATE TRIGGER bugs_fts_ins AFTER INSERT ON bugs BEGIN SELECT 1; END;
        CREATE TRIGGER tests_fts_upd AFTER UPDATE OF title, raw ON tests BEGIN SELECT 1; END;
        CREATE INDEX bugs_test ON bugs(test_id, reported_at);
        CREATE INDEX bugs_tester ON bugs(tester);
        DROP INDEX bugs_test_facets;
        CREATE INDEX bugs_test_summary ON bugs(test_id, status, severity, bug_type, known, rejection_reason);
        PRAGMA user_version = 2;""")
    conn.close()
    assert cli(capsys, "sync", "--status")[0] == 0
    names = {name for (name,) in db_rows(env, "SELECT name FROM sqlite_master WHERE type IN ('trigger', 'index')")}
    assert {"bugs_fts_ins", "tests_fts_upd", "bugs_test", "bugs_tester", "bugs_test_summary"} & names == set()
    assert {"bugs_test_facets", "bugs_feature_status", "bugs_fts_del", "tests_fts_del"} <= names
    assert db_rows(env, "PRAGMA user_version") == [(tm.SCHEMA_VERSION,)]
    lean_account.add_tests(lean_account.product_ids()[0], 1)
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    assert_matches_truth(env, lean_account)
    assert db_rows(env, "SELECT count(*) FROM search_fts WHERE entity = 'bug'") == db_rows(env, "SELECT count(*) FROM bugs")


def test_a_version_6_database_gets_a_full_text_index_of_product_ids_and_the_wider_bugs_index(
        env, capsys, lean_account):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    schema = "SELECT name, sql FROM sqlite_master WHERE name IN ('search_fts', 'bugs_product_status') ORDER BY 1"
    fresh = db_rows(env, schema)
    conn = sqlite3.connect(env)  # what version 6 had: product_id stored, not indexed; a narrower index
    conn.executescript(f"""
        DROP INDEX bugs_product_status;
        CREATE INDEX bugs_product_status ON bugs(product_id, status, severity);
        DROP TABLE search_fts;
        CREATE VIRTUAL TABLE search_fts USING fts5(title, body, entity UNINDEXED, product_id UNINDEXED,
                                                   tokenize = 'unicode61 remove_diacritics 2');
        {tm.FTS_FILL}
        PRAGMA user_version = 6;""")
    conn.close()
    pid = lean_account.product_ids()[0]
    assert db_rows(env, "SELECT count(*) FROM search_fts WHERE search_fts MATCH ?", (f'product_id : "{pid}"',)) == [(0,)]
    assert cli(capsys, "sync", "--status")[0] == 0
    assert db_rows(env, "PRAGMA user_version") == [(tm.SCHEMA_VERSION,)]
    assert db_rows(env, schema) == fresh and len(fresh) == 2
    assert dict(db_rows(env, "SELECT entity, count(*) FROM search_fts GROUP BY entity")) == {
        t[:-1]: db_rows(env, f"SELECT count(*) FROM {t}")[0][0] for t in ("products", "features", "tests", "bugs")}
    assert db_rows(env, "SELECT count(*) FROM search_fts WHERE search_fts MATCH ?", (f'product_id : "{pid}"',)) == \
        db_rows(env, "SELECT 1 + (SELECT count(*) FROM features WHERE product_id = :p) + (SELECT count(*) FROM tests "
                     "WHERE product_id = :p) + (SELECT count(*) FROM bugs WHERE product_id = :p)", {"p": pid})
    assert db_rows(env, "PRAGMA integrity_check") == [("ok",)]


def test_a_version_7_database_keeps_each_test_and_bug_time_under_the_name_changed_at(
        env, capsys, lean_account):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    columns = {t: db_rows(env, f"PRAGMA table_info({t})") for t in ("tests", "bugs")}
    times = {t: db_rows(env, f"SELECT id, changed_at FROM {t} ORDER BY id") for t in columns}
    conn = sqlite3.connect(env)  # what version 7 had: the same times under the name synced_at
    conn.executescript("""
        ALTER TABLE tests RENAME COLUMN changed_at TO synced_at;
        ALTER TABLE bugs RENAME COLUMN changed_at TO synced_at;
        PRAGMA user_version = 7;""")
    conn.close()
    assert cli(capsys, "sync", "--status")[0] == 0
    assert db_rows(env, "PRAGMA user_version") == [(tm.SCHEMA_VERSION,)]
    assert {t: db_rows(env, f"PRAGMA table_info({t})") for t in columns} == columns
    assert {t: db_rows(env, f"SELECT id, changed_at FROM {t} ORDER BY id") for t in columns} == times
    lean_account.add_tests(lean_account.product_ids()[0], 3)
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    assert_matches_truth(env, lean_account)


def test_a_version_7_database_gets_the_change_log_with_a_baseline_per_synced_product(env, capsys, lean_account):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    data = every_row(env)
    conn = sqlite3.connect(env)  # what version 7 had: no change log
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND sql LIKE "
                                "'%INSERT INTO changes%'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.executescript("DROP TABLE changes; DROP VIEW change_stamp; DROP VIEW change_logged; "
                       "DROP INDEX sync_runs_running; ALTER TABLE tests RENAME COLUMN changed_at TO synced_at; "
                       "ALTER TABLE bugs RENAME COLUMN changed_at TO synced_at; PRAGMA user_version = 7;")
    conn.close()
    assert cli(capsys, "sync", "--status")[0] == 0
    assert db_rows(env, "PRAGMA user_version") == [(tm.SCHEMA_VERSION,)]
    assert every_row(env) == data
    assert db_rows(env, "SELECT product_id, kind FROM changes ORDER BY 1") == [
        (p, "baseline") for p in sorted(lean_account.product_ids())]
    pid = lean_account.product_ids()[0]
    [new] = lean_account.add_tests(pid, 1)
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    assert db_rows(env, "SELECT DISTINCT kind, product_id, test_id FROM changes WHERE kind != 'baseline' "
                        "ORDER BY 1") == [("bug_new", pid, new), ("test_new", pid, new)]


def test_a_migration_step_can_add_a_column_that_an_index_of_schema_sql_covers(env, capsys, lean_account,
                                                                                monkeypatch):
    assert cli(capsys, "sync", transport=mock(lean_account.handler))[0] == 0
    counts = every_row(env)
    schema = (HERE / "schema.sql").read_text()
    last = "    bugs_synced_at TEXT                           -- NULL: the bugs must be (re)fetched\n);\n"
    assert last in schema
    future = schema.replace(last, "    bugs_synced_at TEXT,\n    priority INTEGER\n);\n"
                                  "CREATE INDEX IF NOT EXISTS tests_priority ON tests(priority);\n")
    version = tm.SCHEMA_VERSION + 1
    monkeypatch.setattr(tm, "_schema_sql", lambda: future)
    monkeypatch.setattr(tm, "SCHEMA_VERSION", version)
    monkeypatch.setitem(tm.MIGRATIONS, version, "ALTER TABLE tests ADD COLUMN priority INTEGER;")
    # an upgrade (a read-only command), and a database made from scratch (a sync)
    for path, args in ((env, ("sync", "--status")), (env.with_name("fresh.db"), ("sync",))):
        monkeypatch.setenv("TESTIO_DB_PATH", str(path))
        code, _, err = cli(capsys, *args, transport=mock(lean_account.handler))
        assert code == 0, err
        assert db_rows(path, "PRAGMA user_version") == [(version,)]
        assert "priority" in [r[1] for r in db_rows(path, "PRAGMA table_info(tests)")]
        assert db_rows(path, "SELECT name FROM sqlite_master WHERE name = 'tests_priority'") == [("tests_priority",)]
    assert {t: rows for t, rows in every_row(env).items() if t != "tests"} == {
        t: rows for t, rows in counts.items() if t != "tests"}
    assert [r[:-1] for r in every_row(env)["tests"]] == counts["tests"]


###############################################################################
# Files: private directory and database files
###############################################################################

@pytest.mark.parametrize("where", ["data/cache.db", "a/b/c/cache.db"])
def test_the_data_directory_is_0700_and_database_files_0600_under_umask_022(env, capsys, monkeypatch, tmp_path,
                                                                          lean_account, where):
    db_path = tmp_path / where
    monkeypatch.setenv("TESTIO_DB_PATH", str(db_path))
    modes = {}

    def snoop(request, n):  # mid-sync, while -wal and -shm exist
        if request.url.path.endswith("/bugs"):
            modes.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in db_path.parent.iterdir()})

    old = os.umask(0o022)
    try:
        code, _, err = cli(capsys, "sync", transport=mock(Faults(lean_account.handler).add(snoop)))
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert modes == {"cache.db": 0o600, "cache.db-wal": 0o600, "cache.db-shm": 0o600, "cache.db.lock": 0o600}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in db_path.parent.iterdir()} == {
        "cache.db": 0o600, "cache.db.lock": 0o600}


###############################################################################
# The installed wheel, and README's quick start on a Python that refuses global installs
###############################################################################

def run(argv, **kw):
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False, **kw)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result


@pytest.mark.slow
def test_the_installed_wheel_runs_version_and_a_demo_sync_outside_the_checkout(env, tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", dist, HERE])
    (wheel,) = dist.glob("testio_cache_mcp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"testio_mcp.py", "testio_mcp_schema.sql"} <= set(names) and "schema.sql" not in names
    info = f"testio_cache_mcp-{tm.__version__}.dist-info"
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode().split("\n\n")[0].splitlines()
    assert {"Name: testio-cache-mcp", "License-Expression: MIT", "License-File: LICENSE",
            "Requires-Python: >=3.10"} <= set(meta)
    assert [line for line in meta if line.startswith("Classifier: Programming Language :: Python :: 3.")] == [
        f"Classifier: Programming Language :: Python :: 3.{minor}" for minor in (10, 11, 12, 13)]
    assert zipfile.ZipFile(wheel).read(f"{info}/licenses/LICENSE").decode().startswith("MIT License\n")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    purelib = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                   .stdout.strip())
    # A venv made from a venv sees the base interpreter's packages, not the test env's: point it at them
    # (plain paths: the test env's editable-install .pth files are not processed, so the checkout stays off).
    (purelib / "_test_env.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
         "-q", wheel])

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(TESTIO_DB_PATH=str(outside / "data" / "cache.db"), LOG_LEVEL="WARNING")
    where = run([venv / "bin" / "python", "-c", "import testio_mcp, httpx; print(testio_mcp.__file__)"],
                cwd=outside, env=environ).stdout.strip()
    assert Path(where) == purelib / "testio_mcp.py"
    assert (purelib / "testio_mcp_schema.sql").read_text() == (HERE / "schema.sql").read_text()
    assert not (purelib / "schema.sql").exists()
    assert run([venv / "bin" / "testio-mcp", "--version"], cwd=outside, env=environ).stdout == \
        f"testio-mcp {tm.__version__}\n"
    result = run([venv / "bin" / "testio-mcp", "sync", "--demo"], cwd=outside, env=environ)
    assert "refresh sync success" in result.stderr  # after the demo's week of history
    demo = outside / "data" / "demo.db"
    assert db_rows(demo, "SELECT count(*) FROM tests")[0][0] > 0
    assert db_rows(demo, "SELECT count(*) FROM search_fts")[0][0] > 0
    assert not (outside / "data" / "cache.db").exists()


def _externally_managed_python(root: Path) -> Path:
    """A base Python (not a venv) that refuses global installs the way Debian's, Ubuntu's and Homebrew's
    do (PEP 668: an EXTERNALLY-MANAGED file in its stdlib directory): a copy of this interpreter's
    executable in root/bin, which finds its prefix in root, whose lib/pythonX.Y links the real stdlib."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib, lib = Path(sysconfig.get_path("stdlib")), root / "lib" / version
    lib.mkdir(parents=True)
    (root / "bin").mkdir()
    # a copy, not a link: Python looks for its stdlib beside its executable's real path
    shutil.copy2(os.path.realpath(Path(sys.base_prefix) / "bin" / version), root / "bin" / version)
    (root / "bin" / "python3").symlink_to(version)
    for entry in stdlib.iterdir():  # the real stdlib, less its packages and any marker of its own
        if entry.name not in ("site-packages", "dist-packages", "EXTERNALLY-MANAGED"):
            (lib / entry.name).symlink_to(entry)
    (lib / "site-packages").mkdir()
    for shared in Path(sys.base_prefix, "lib").glob("libpython*"):  # for builds that find it via $ORIGIN
        (root / "lib" / shared.name).symlink_to(shared)
    (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=simulated by the test\n")
    return root / "bin" / "python3"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="copies a Linux interpreter into a prefix of its own")
def test_the_readme_quick_start_installs_with_a_python_that_refuses_global_installs(tmp_path):
    project = tmp_path / "checkout"
    project.mkdir()
    for name in ("testio_mcp.py", "schema.sql", "pyproject.toml", "README.md", "LICENSE"):
        if (HERE / name).exists():
            shutil.copy2(HERE / name, project / name)
    python3 = _externally_managed_python(tmp_path / "system")
    # Only `python3` on PATH (no `python`, no pip), as on a stock Debian. Offline: the dependencies are
    # found on PYTHONPATH (this test environment's site-packages, not its .pth files) and the package is
    # built without isolation (pip reads PIP_NO_BUILD_ISOLATION as the option's value: 0 turns it off).
    environ = {"PATH": str(python3.parent), "HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1",
               "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))}
    refused = subprocess.run([python3, "-m", "pip", "install", "--no-deps", project], capture_output=True,
                             text=True, timeout=120, env=environ, check=False)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr, refused.stderr

    parts = readme_quick_start()[0].split(" && ")  # the first command, up to where it starts the demo
    setup = " && ".join(parts[:next(i for i, part in enumerate(parts) if "testio-mcp" in part)])
    assert setup.startswith("python3 -m venv .venv && ")  # what the README asks of the machine
    run([shutil.which("bash"), "-c", setup], cwd=project, env=environ)
    venv_bin = project / ".venv" / "bin"
    assert run([venv_bin / "testio-mcp", "--version"], cwd=tmp_path, env=environ).stdout == \
        f"testio-mcp {tm.__version__}\n"
    where = run([venv_bin / "python", "-c", "import testio_mcp; print(testio_mcp.__file__)"], cwd=tmp_path,
                env=environ).stdout.strip()
    assert Path(where) == project / "testio_mcp.py"  # the editable install points at the checkout


###############################################################################
# Bad flags and values: one line, no traceback, nothing touched
###############################################################################

BAD_ARGV = [
    (["sync", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["sync", "--since", "2026-13-45"], 1, "--since='2026-13-45' is not a date"),
    (["sync", "--since", "yesterday"], 1, "--since='yesterday' is not a date"),
    (["sync", "--product-ids", "abc"], 1, "--product-ids='abc': 'abc' is not a positive whole number"),
    (["sync", "--product-ids", "0"], 1, "'0' is not a positive whole number"),
    (["sync", "--product-ids", "1,,2"], 1, "'' is not a positive whole number"),
    (["sync", "--lock-timeout", "x"], 2, "argument --lock-timeout: 'x' is not a number of seconds"),
    (["sync", "--lock-timeout", "nan"], 2, "argument --lock-timeout: 'nan' is not a number of seconds"),
    (["sync", "--lock-timeout", "inf"], 2, "argument --lock-timeout: 'inf' is not a number of seconds"),
    (["sync", "--lock-timeout", "-1"], 2, "argument --lock-timeout: '-1' is not a number of seconds"),
    (["sync", "--force", "--refresh"], 2, "not allowed with argument"),
    (["sync", "--status", "--nuke"], 2, "not allowed with argument"),
    (["problematic"], 2, "the following arguments are required: {list,map-tests,retry,clear}"),
    (["problematic", "retry", "0"], 2, "'0' is not a positive whole number"),
    (["problematic", "retry", "abc"], 2, "'abc' is not a positive whole number"),
    (["problematic", "retry"], 2, "the following arguments are required: product_id"),
    (["problematic", "map-tests", "abc123", "x1"], 2, "'x1' is not a positive whole number"),
    (["problematic", "map-tests", "abc123"], 2, "the following arguments are required: TEST_ID"),
    (["problematic", "explode"], 2, "invalid choice: 'explode'"),
    (["serve", "--transport", "pigeon"], 2, "invalid choice: 'pigeon'"),
    (["serve", "--port", "http"], 2, "argument --port: invalid int value: 'http'"),
    (["--env-file", "/nonexistent/x.env", "sync"], 2, "--env-file /nonexistent/x.env: no such file"),
]


@pytest.mark.parametrize("argv, exit_code, message", BAD_ARGV, ids=[" ".join(a) for a, _, _ in BAD_ARGV])
def test_bad_flags_and_values_exit_non_zero_with_one_line_and_touch_nothing(env, capsys, lean_account, argv,
                                                                           exit_code, message):
    code, out, err = cli(capsys, *argv, transport=mock(lean_account.handler))
    assert code == exit_code
    line = one_line(err)
    assert message in line and line.startswith("testio-mcp")
    assert "Traceback" not in err and out == ""
    assert not env.parent.exists() and sum(lean_account.requests.values()) == 0


def test_mapping_tests_to_an_unknown_event_names_it_and_the_next_step(env, capsys):
    create_database(env)
    code, _, err = cli(capsys, "problematic", "map-tests", "feedc0ffee00", "123")
    assert code == 1
    assert one_line(err) == ("testio-mcp: no problematic event 'feedc0ffee00'; see `testio-mcp problematic list`")
    assert db_rows(env, "SELECT count(*) FROM problematic_tests") == [(0,)]


###############################################################################
# Retry policy of test pages inside a sync: HTTP 500 splits the page soon, the rest retries fully
###############################################################################

@pytest.mark.parametrize("failure", [502, 503, 504, 524, httpx.ReadTimeout, httpx.RemoteProtocolError], ids=str)
def test_a_tests_page_absorbs_transient_failures_like_any_other_request(env, capsys, failure):
    acc = make_account(products=1, tests_per_product=60, bugs_per_test=1)
    left = {"n": tm.MAX_RETRIES}

    def flaky_first_page(request, n):
        if request.url.params.get("page") == "1" and left["n"] > 0:
            left["n"] -= 1
            return httpx.Response(failure) if isinstance(failure, int) else failure("flaky", request=request)
        return None

    faults = Faults(acc.handler).add(flaky_first_page)
    code, _, err = cli(capsys, "sync", transport=mock(faults))
    assert code == 0, err
    assert left["n"] == 0
    # page 1 until it answers; pages 2 and 3 (past the end) were asked for with it, once each
    assert sorted(pages_read(faults.log, acc.product_ids()[0])) == [1] * (tm.MAX_RETRIES + 1) + [2, 3]
    assert_matches_truth(env, acc)
    assert runs(env) == [("incremental", "success")]


def test_a_tests_page_failing_500_is_split_after_page_retries_not_max_retries(env, capsys):
    acc = make_account(products=1, tests_per_product=60, bugs_per_test=1)
    faults = Faults(acc.handler).add(
        lambda r, n: httpx.Response(500) if r.url.params.get("per_page") == "100" else None)
    code, _, err = cli(capsys, "sync", transport=mock(faults))
    assert code == 0, err
    pid = acc.product_ids()[0]
    pages = pages_read(faults.log, pid)
    assert [p for p in pages if p == 1] == [1] * (tm.PAGE_RETRIES + 1) and tm.PAGE_RETRIES < tm.MAX_RETRIES
    assert set(pages) <= {1, 2, 3}  # 2 and 3 were read ahead (and failed too): never retried at 25
    assert pages_read(faults.log, pid, per_page=25) == [1, 2, 3]  # the same offsets in smaller pages
    assert_matches_truth(env, acc)
    assert runs(env) == [("incremental", "success")]


###############################################################################
# MCP server: the tools in memory, read-through, progress, stdio and HTTP subprocesses
###############################################################################

# MCP server tests (issue 3, and the server side of issue 5): the tools through the SDK's
# in-memory Client (handshake era, like Claude clients), one stdio subprocess through the SDK, raw
# JSON-RPC over pipes, one HTTP subprocess, and the CLI. The simulated account behind
# httpx.MockTransport (wrapped in Faults for failures) is the only fake; every expectation is
# computed from what that fake served (acc.test_json / bugs_of / features_of / products_json).





TOOLS = ("health_check", "list_products", "list_tests", "get_test_status", "list_bugs", "get_bug",
         "get_review_queue", "list_features", "get_quality_report", "query_metrics", "search", "sync_data",
         "get_database_stats", "get_sync_history", "get_problematic_tests", "get_changes")
EXECUTED = ("running", "locked", "archived", "customer_finalized")
# The default rejection comments, copied from the API notes (not from the module under test).
REASON_TEXT = {
    "device_not_relevant": "This device is not relevant and the bug will not be fixed.",
    "ignored_instructions": "The test instructions were not followed.",
    "intended_behavior": "The behaviour/design described here is intentional.",
    "irrelevant": "This bug is not relevant and will not be fixed.",
    "known_bug": "This is a legit bug but already known.",
    "not_reproducible": "With the information provided it was not possible to reproduce this bug.",
    "request_timeout": "Your bug was rejected automatically, because you didn't respond to the request "
                       "within 24 hours",
}
SQL_LEAKS = ("sqlite", "syntax error", "no such column", "no such table", "operationalerror", "traceback",
             "fts5")
SUBPROCESS_TIMEOUT = 30


###############################################################################
# Helpers: a synced database to copy, an in-memory client, truth from the fake
###############################################################################

@pytest.fixture(scope="module")
def synced_template(tmp_path_factory):
    """make_account() synced once through the CLI; tests work on copies (a sync costs ~1.5 s)."""
    root = tmp_path_factory.mktemp("synced")
    with pytest.MonkeyPatch.context() as mp:
        path = clean_environment(mp, root)
        with restored_logging():
            assert tm.main(["sync"], transport=transport_for(make_account().handler)) == 0
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    return path


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory):
    """The whole --demo account as it stands at NOW (4 products, ~3,000 tests, ~23,000 bugs) synced
    through the CLI; its first product id."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        path = clean_environment(mp, root)
        mp.delenv("TESTIO_CUSTOMER_API_BASE_URL")
        mp.setenv("LOG_LEVEL", "WARNING")
        demo = demo_truth()
        first = demo.product_ids()[0]
        with restored_logging():
            assert tm.main(["--demo", "sync"], transport=transport_for(demo.handler)) == 0
    return path.with_name("demo.db"), first


@contextlib.contextmanager
def restored_logging():
    """main() sets up logging for a CLI run (a stderr handler bound to a capture stream pytest closes
    later, WARNING for httpx/mcp); put the logging of the test session back afterwards."""
    root = logging.getLogger()
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "mcp", "uvicorn")}
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in noisy.items():
            logging.getLogger(name).setLevel(old)


@pytest.fixture(scope="module", autouse=True)
def _session_logging():
    """An in-process main() of an earlier test file may have left its stderr handler on the root
    logger, bound to a capture stream pytest has closed since (every record would print a logging
    error), and httpx/mcp at WARNING: start this module from clean, DEBUG-capable logging."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(getattr(h, "stream", None), "closed", False)]
    for name in ("httpx", "httpcore", "mcp", "uvicorn"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield


@pytest.fixture
def db(env, synced_template, monkeypatch):
    """`env` plus a copy of the synced database; the server starts no background sync (interval 0)."""
    env.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(synced_template, env)
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    return env


@contextlib.asynccontextmanager
async def mcp_client(handler, **client_options):
    """An in-memory, handshake-era client of a server built from the current environment."""
    runtime = tm.Runtime(tm.Settings.from_env(), transport_for(handler))
    async with Client(tm.build_server(runtime), mode="legacy", **client_options) as client:
        yield client


RESULT_TEXTS: list[str] = []  # every tool answer of this module, for the canary test


async def ok(client, tool: str, args: dict | None = None, **options) -> dict:
    """Call a tool that must succeed; returns its structured content (checked to match the text)."""
    result = await client.call_tool(tool, args or {}, **options)
    text = result.content[0].text
    RESULT_TEXTS.append(text)
    assert result.is_error is False, text
    assert TOKEN not in text
    data = result.structured_content
    assert "data_as_of" in data
    assert json.loads(text) == data
    return data


async def err(client, tool: str, args: dict) -> str:
    """Call a tool that must answer with an error result; returns its text."""
    result = await client.call_tool(tool, args)
    text = result.content[0].text
    RESULT_TEXTS.append(text)
    assert result.is_error is True, text
    assert TOKEN not in text
    assert not any(word in text.lower() for word in SQL_LEAKS), text
    assert "failed unexpectedly" not in text, text
    return text


def utc(stamp: str | None) -> str | None:
    """An API timestamp (any offset) as UTC text, computed independently of the module."""
    if stamp is None:
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def shown_status(bug: dict) -> str:
    if bug["status"] == "forwarded":
        return "open"
    if bug["status"] == "accepted" and bug["auto_accepted"]:
        return "auto_accepted"
    return bug["status"]


def shown_type(severity: str) -> str:
    return "functional" if severity in ("low", "high", "critical") else severity


def shown_testing_type(value: str | None) -> str:
    return {"external": "custom", None: "test_case"}.get(value, value)


def reason_of(bug: dict) -> str | None:
    if bug["status"] != "rejected":
        return None
    for comment in bug["comments"]:
        for reason, text in REASON_TEXT.items():
            if text in comment["body"]:
                return reason
    return "other"


def bug_counts(bugs: list[dict]) -> dict:
    status = collections.Counter(shown_status(b) for b in bugs)
    return {"total": len(bugs), "open": status["open"], "accepted": status["accepted"],
            "auto_accepted": status["auto_accepted"], "rejected": status["rejected"],
            "critical": sum(b["severity"] == "critical" for b in bugs)}


def rates(accepted: int, auto: int, rejected: int, total: int) -> dict:
    """The five rates of the API notes; an empty denominator gives None."""
    def ratio(a, b):
        return round(a / b, 4) if b else None
    return {"active_acceptance_rate": ratio(accepted, total), "auto_acceptance_rate": ratio(auto, accepted + auto),
            "overall_acceptance_rate": ratio(accepted + auto, total), "rejection_rate": ratio(rejected, total),
            "review_rate": ratio(accepted + rejected, total)}


def bug_rates(bugs: list[dict]) -> dict:
    c = bug_counts(bugs)
    return rates(c["accepted"], c["auto_accepted"], c["rejected"], c["total"])


def health(r: dict) -> dict:
    """The customers' thresholds from the API notes."""
    def grade(value, warning, critical, above):
        if value is None:
            return "unknown"
        if above:
            return "critical" if value >= critical else "warning" if value >= warning else "healthy"
        return "critical" if value <= critical else "warning" if value <= warning else "healthy"
    return {"rejection_rate": grade(r["rejection_rate"], 0.20, 0.35, True),
            "auto_acceptance_rate": grade(r["auto_acceptance_rate"], 0.20, 0.40, True),
            "active_acceptance_rate": grade(r["active_acceptance_rate"], 0.35, 0.20, False),
            "review_rate": grade(r["review_rate"], 0.80, 0.60, False)}


def bug_summary(bugs: list[dict]) -> dict:
    """What a bug summary block must say about these bugs."""
    c = bug_counts(bugs)
    r = bug_rates(bugs)
    rejected = [b for b in bugs if b["status"] == "rejected"]
    return {"total": c["total"],
            "by_status": {k: c[k] for k in ("open", "accepted", "auto_accepted", "rejected")},
            "by_severity": dict(collections.Counter(b["severity"] for b in bugs)),
            "by_type": dict(collections.Counter(shown_type(b["severity"]) for b in bugs)),
            "known": sum(bool(b["known"]) for b in bugs), "rates": r, "health": health(r),
            "rejection_reasons": dict(collections.Counter(reason_of(b) for b in rejected))}


PRISTINE = make_account()  # never changed: the truth for every test that leaves the account alone


@functools.cache
def _served_tests(pid: int) -> tuple[dict, ...]:
    return tuple(PRISTINE.test_json(t) for t in PRISTINE.test_ids(pid))


@functools.cache
def _served_bugs(test_id: int) -> tuple[dict, ...]:
    return tuple(PRISTINE.bugs_of(test_id))


def served_tests(pid: int) -> list[dict]:
    """The tests of a product, newest end first, as the pristine account serves them (cached)."""
    return list(_served_tests(pid))


def served_bugs(test_id: int) -> list[dict]:
    """The bugs of a test as the pristine account serves them (cached)."""
    return list(_served_bugs(test_id))


def bugs_of_product(pid: int) -> list[dict]:
    return [b for t in PRISTINE.test_ids(pid) for b in served_bugs(t)]


PIDS = PRISTINE.product_ids()
P = PIDS[0]                                   # the product most tests look at (no sections)
NAMES = {p["id"]: p["name"] for p in PRISTINE.products_json()}


def newest_first(bugs: list[dict]) -> list[int]:
    return [b["id"] for b in sorted(bugs, key=lambda b: (utc(b["reported_at"]), b["id"]), reverse=True)]


async def pages(client, tool: str, args: dict, per_page: int = 200) -> list[dict]:
    """Every page of a paginated tool's answer, checking each page's pagination and, on each page but
    the last, the note naming the call for the next."""
    answers, page = [], 1
    while True:
        data = await ok(client, tool, {**args, "page": page, "per_page": per_page})
        answers.append(data)
        total = data["pagination"]["total"]
        assert data["pagination"] == {"page": page, "per_page": per_page, "total": total,
                                      "has_more": page * per_page < total}
        if not data["pagination"]["has_more"]:
            return answers
        assert data["notes"][-1].startswith(f"{(page - 1) * per_page + 1}-{page * per_page} of {total} shown; "
                                            f"call {tool} again with page={page + 1}")
        page += 1


async def all_pages(client, tool: str, args: dict, key: str) -> list[dict]:
    """Every row of a paginated tool (pages())."""
    answers = await pages(client, tool, args)
    rows = [row for data in answers for row in data[key]]
    assert len(rows) == answers[-1]["pagination"]["total"]
    return rows


###############################################################################
# tools/list: names, schemas, descriptions, annotations
###############################################################################

@pytest.mark.anyio
async def test_tools_list_offers_exactly_the_registered_tools_each_with_output_schema_and_described_parameters(db):
    async with mcp_client(make_account().handler) as client:
        tools = (await client.list_tools()).tools
    assert sorted(t.name for t in tools) == sorted(TOOLS)
    for tool in tools:
        assert tool.description and len(tool.description) > 40, tool.name
        assert tool.output_schema and tool.output_schema["type"] == "object", tool.name
        assert "data_as_of" in tool.output_schema["properties"], tool.name
        for name, schema in tool.input_schema.get("properties", {}).items():
            assert schema.get("description"), f"{tool.name}.{name} has no description"


@pytest.mark.anyio
async def test_every_registered_tool_is_listed_in_order_with_its_docstring_title_and_hints(db):
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    async with mcp_client(make_account().handler) as client:
        listed = (await client.list_tools()).tools
    assert [t.name for t in listed] == list(tm.TOOLS) == list(TOOLS)
    for tool in listed:
        spec = tm.TOOLS[tool.name]
        assert spec.fn.__doc__ and tool.description == inspect.cleandoc(spec.fn.__doc__), tool.name
        assert tool.title == spec.title and f"`{tool.name}`" in readme, tool.name
        assert (tool.annotations.read_only_hint, tool.annotations.idempotent_hint,
                tool.annotations.open_world_hint) == (spec.read_only, spec.read_only, spec.open_world)
        parameters = inspect.signature(spec.fn).parameters
        assert list(parameters)[0] == "state", tool.name
        for name, parameter in parameters.items():  # a list argument also takes "a,b" (_accepted says so)
            meta = getattr(parameter.annotation, "__metadata__", ())
            base = parameter.annotation.__origin__ if meta else parameter.annotation
            if list in (getattr(base, "__origin__", None), *(getattr(a, "__origin__", None)
                                                              for a in getattr(base, "__args__", ()))):
                assert [m.commas for m in meta if isinstance(m, tm.Arg)] == [True], f"{tool.name}.{name}"


VOCABULARIES = ("TEST_STATUSES", "TESTING_TYPES", "BUG_STATUSES", "SEVERITIES", "BUG_TYPES", "REASONS",
                "PRODUCT_TYPES", "SEARCH_ENTITIES", "SYNC_MODES", "TOOL_SYNC_MODES", "SORT_ORDERS",
                "TRANSPORTS", "METRICS", "METRIC_DIMENSIONS", "METRIC_FILTERS", "TEST_SORTS", "CHANGE_KINDS")


def _enums(schema):
    """Every enum list anywhere in a JSON schema."""
    if isinstance(schema, dict):
        if "enum" in schema:
            yield schema["enum"]
        for value in schema.values():
            yield from _enums(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _enums(value)


@pytest.mark.anyio
async def test_every_enum_and_choice_is_a_vocabulary_declared_once_and_the_stored_data_stays_inside_them(db):
    words = {name: list(getattr(tm, name)) for name in VOCABULARIES}
    words["BUG_STATUSES and the API's words"] = [*tm.BUG_STATUSES, *tm.BUG_STATUS_ALIASES]
    async with mcp_client(make_account().handler) as client:
        tools = (await client.list_tools()).tools
    offered = [(tool.name, enum) for tool in tools for enum in _enums(tool.input_schema)]
    assert len(offered) >= 14 and [(name, enum) for name, enum in offered if enum not in words.values()] == []
    commands = tm.build_parser()._subparsers._group_actions[0].choices
    assert [action.choices for action in commands["serve"]._actions if action.choices] == [tm.TRANSPORTS]
    flags = {action.dest for action in commands["sync"]._actions}
    assert [mode for mode in tm.SYNC_MODES if mode not in flags] == ["incremental"]  # the default
    for check in re.findall(r"CHECK\s*\(\s*\w+\s+IN\s*\(([^)]*)\)", (HERE / "schema.sql").read_text()):
        assert [w.strip(" '") for w in check.split(",")] in words.values(), check
    for subset in (tm.FINAL_STATUSES, tm.PRE_RUN_STATUSES, tm.EXECUTED_STATUSES):
        assert set(subset) <= set(tm.TEST_STATUSES)
    assert set(tm.FUNCTIONAL_SEVERITIES) <= set(tm.SEVERITIES)
    assert set(tm.COMPLETED_RUN_STATUSES) <= set(tm.RUN_STATUSES)
    # a list of words in SQL: schema.sql spells out a vocabulary (a partial index's WHERE), the module
    # formats its constants in (_sql_words) and spells out none
    subsets = [list(getattr(tm, name)) for name in ("FINAL_STATUSES", "PRE_RUN_STATUSES", "EXECUTED_STATUSES",
                                                    "COMPLETED_RUN_STATUSES")]
    listed = re.findall(r"\bIN\s*\(\s*('[^)]*)\)", (HERE / "schema.sql").read_text())
    assert listed and [w for w in listed if [x.strip(" '") for x in w.split(",")] not in [*words.values(),
                                                                                       *subsets]] == []
    assert re.findall(r"\bIN\s*\(\s*'", (HERE / "testio_mcp.py").read_text()) == []
    assert set(tm.TOOL_SYNC_MODES) <= set(tm.SYNC_MODES)
    assert set(tm.BUG_STATUS_ALIASES.values()) <= set(tm.BUG_STATUSES)
    # the pure helpers map the API's words into the vocabularies, and the data a sync stored holds no other
    assert {tm.bug_type(severity) for severity in tm.SEVERITIES} == set(tm.BUG_TYPES)
    assert {tm.bug_status({"status": s, "auto_accepted": auto}) for s in ("forwarded", "accepted", "rejected")
            for auto in (False, True)} == set(tm.BUG_STATUSES)
    columns = {"tests.status": tm.TEST_STATUSES, "tests.testing_type": tm.TESTING_TYPES,
               "bugs.status": tm.BUG_STATUSES, "bugs.severity": tm.SEVERITIES, "bugs.bug_type": tm.BUG_TYPES,
               "bugs.rejection_reason": tm.REASONS, "products.type": tm.PRODUCT_TYPES}
    stored = {key: {row[0] for row in db_rows(db, "SELECT DISTINCT {1} FROM {0} WHERE {1} IS NOT NULL".format(
        *key.split(".")))} for key in columns}
    assert all(stored.values())
    assert {key: values - set(columns[key]) for key, values in stored.items()} == {key: set()
                                                                                   for key in columns}
    assert {row[0] for row in db_rows(db, "SELECT status FROM sync_runs")} <= set(tm.RUN_STATUSES)


@pytest.mark.anyio
async def test_every_tool_but_sync_data_is_marked_read_only(db):
    async with mcp_client(make_account().handler) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    hints = {name: tools[name].annotations.read_only_hint for name in TOOLS}
    assert hints == {name: name != "sync_data" for name in TOOLS}
    assert tools["sync_data"].annotations.idempotent_hint is False
    assert tools["sync_data"].annotations.open_world_hint is True


TOOLS_LIST_BUDGET = 24_500  # bytes of tools/list as a client gets it (issue 11: at most 24.5 KB)


def _schema_titles(schema) -> int:
    """How many "title" keywords a JSON schema holds (a property named title is not one)."""
    if isinstance(schema, dict):
        return sum(k == "title" for k in schema) + sum(
            sum(map(_schema_titles, v.values())) if k == "properties" else _schema_titles(v) for k, v in schema.items())
    return sum(map(_schema_titles, schema)) if isinstance(schema, list) else 0


@pytest.mark.anyio
async def test_tools_list_stays_within_its_context_budget_and_its_schemas_restate_no_names_or_defaults(db):
    async with mcp_client(make_account().handler) as client:
        listed = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                  for t in (await client.list_tools()).tools]
    text = json.dumps(listed, separators=(",", ":"))
    assert len(text) <= TOOLS_LIST_BUDGET and '"additionalProperties":true' not in text
    assert {t["name"]: _schema_titles(t["inputSchema"]) + _schema_titles(t["outputSchema"]) for t in listed} == {
        name: 0 for name in TOOLS}


###############################################################################
# Answers match what the fake served
###############################################################################

@pytest.mark.anyio
async def test_list_products_lists_every_product_with_test_counts(db):
    acc = make_account()
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "list_products")
        by_type = await ok(client, "list_products", {"product_type": acc.products_json()[1]["type"]})
        by_name = await ok(client, "list_products", {"search": acc.products_json()[2]["name"][7:15].upper()})
    now = datetime.now(timezone.utc)
    month_ago = (now - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    now_text = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    expected = []
    for p in sorted(acc.products_json(), key=lambda p: (p["name"], p["id"])):
        ends = [utc(t["end_at"]) for t in served_tests(p["id"])]
        expected.append({"id": p["id"], "name": p["name"], "type": p["type"], "description": p["description"],
                         "test_count": len(ends), "tests_last_30_days": sum(month_ago <= e <= now_text for e in ends),
                         "newest_test_end": max(e for e in ends if e <= now_text)})
    assert data["total"] == 3
    assert [{k: v for k, v in p.items() if k != "last_synced_at"} for p in data["products"]] == expected
    assert all(p["last_synced_at"] for p in data["products"])
    assert [p["id"] for p in by_type["products"]] == [acc.products_json()[1]["id"]]
    assert [p["id"] for p in by_name["products"]] == [acc.products_json()[2]["id"]]


@pytest.mark.anyio
async def test_list_tests_pages_newest_end_first_with_utc_dates_shown_types_and_bug_counts(db):
    acc = make_account()
    pid = P
    async with mcp_client(acc.handler) as client:
        everything = await ok(client, "list_tests", {"product_id": pid, "per_page": 200})
        page2 = await ok(client, "list_tests", {"product_id": pid, "per_page": 50, "page": 2})
        page3 = await ok(client, "list_tests", {"product_id": pid, "per_page": 50, "page": 3})
    truth = served_tests(pid)
    expected = [{"id": t["id"], "title": t["title"], "status": t["status"], "review_status": t["review_status"],
                 "testing_type": shown_testing_type(t["testing_type"]), "start_at": utc(t["start_at"]),
                 "end_at": utc(t["end_at"]), "bugs": bug_counts(served_bugs(t["id"]))} for t in truth]
    assert everything["product"] == {"id": pid, "name": acc.products_json()[0]["name"]}
    assert everything["pagination"] == {"page": 1, "per_page": 200, "total": 120, "has_more": False}
    assert [{k: v for k, v in row.items() if k != "synced_at"} for row in everything["tests"]] == expected
    assert page2["pagination"] == {"page": 2, "per_page": 50, "total": 120, "has_more": True}
    assert [r["id"] for r in page2["tests"]] == [t["id"] for t in truth[50:100]]
    assert page3["pagination"] == {"page": 3, "per_page": 50, "total": 120, "has_more": False}
    assert [r["id"] for r in page3["tests"]] == [t["id"] for t in truth[100:]]
    # the fake serves mixed offsets and both raw testing types: the shown values are normalised
    assert any(not t["end_at"].endswith("Z") for t in truth)
    assert {"custom", "test_case"} <= {r["testing_type"] for r in everything["tests"]}


@pytest.mark.anyio
async def test_list_tests_returns_titles_with_quotes_escapes_and_emoji_exactly(env, monkeypatch):
    acc = make_account(products=1, tests_per_product=6, bugs_per_test=1)
    pid = acc.product_ids()[0]
    odd = ['He said "hi" \\ /path', "line\nbreak\ttab\u0001bell", "Ünïcødé 🐛 テスト", "'; DROP TABLE tests; --",
           "\u2028\u2029 separators", "</script>&amp;"]
    served: dict[int, str] = {}

    def titled(request, n):
        if request.url.path.endswith(f"/products/{pid}/exploratory_tests"):
            body = json.loads(acc.handler(request).content)
            for test, title in zip(body["exploratory_tests"], odd):
                test["title"] = served[test["id"]] = title
            return httpx.Response(200, json=body)
        return None

    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    async with mcp_client(Faults(acc.handler).add(titled)) as client:
        await ok(client, "sync_data", {})
        data = await ok(client, "list_tests", {"product_id": pid})
    assert len(served) == 6
    assert {r["id"]: r["title"] for r in data["tests"]} == served


@pytest.mark.parametrize("sort_by", ["end_at", "start_at", "id", "title", "status"])
@pytest.mark.parametrize("sort_order", ["asc", "desc"])
@pytest.mark.anyio
async def test_list_tests_sorts_by_each_key_in_both_orders_with_id_breaking_ties(db, sort_by, sort_order):
    acc = make_account()
    pid = acc.product_ids()[1]
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "list_tests", {"product_id": pid, "sort_by": sort_by, "sort_order": sort_order,
                                               "per_page": 200})
    keys = {"end_at": lambda t: utc(t["end_at"]), "start_at": lambda t: utc(t["start_at"]), "id": lambda t: t["id"],
            "title": lambda t: t["title"].lower(), "status": lambda t: t["status"]}
    expected = sorted(served_tests(pid), key=lambda t: (keys[sort_by](t), t["id"]), reverse=sort_order == "desc")
    assert [r["id"] for r in data["tests"]] == [t["id"] for t in expected]


def _ends_within(lo: str | None, hi: str | None):
    def check(t: dict) -> bool:
        end = utc(t["end_at"])
        return (lo is None or end >= f"{lo}T00:00:00Z") and (hi is None or end < f"{hi}T00:00:00Z")
    return check


@pytest.mark.parametrize("args, keep", [
    ({"statuses": ["locked", "archived"]}, lambda t: t["status"] in ("locked", "archived")),
    ({"statuses": "locked, archived"}, lambda t: t["status"] in ("locked", "archived")),
    ({"testing_type": "custom"}, lambda t: t["testing_type"] == "external"),
    ({"testing_type": "test_case"}, lambda t: t["testing_type"] is None),
    ({"start_date": "2026-01-01", "end_date": "2026-03-31"}, _ends_within("2026-01-01", "2026-04-01")),
    ({"start_date": "2026-11-27"}, _ends_within("2026-11-27", None)),
    ({"end_date": "2025-01-31"}, _ends_within(None, "2025-02-01")),
    ({"start_date": "0001-01-01", "end_date": "9999-12-31"}, lambda t: True),
    ({"statuses": "archived", "testing_type": "rapid", "start_date": "2025-06-01"},
     lambda t: t["status"] == "archived" and t["testing_type"] == "rapid" and utc(t["end_at"]) >= "2025-06-01"),
], ids=["status-list", "status-comma-string", "custom-is-external", "test-case-is-null", "quarter",
        "from-today", "until-jan-2025", "first-to-last-representable-day", "combined"])
@pytest.mark.anyio
async def test_list_tests_filters_by_status_testing_type_and_end_date(db, args, keep):
    acc = make_account()
    pid = P
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "list_tests", {"product_id": pid, "per_page": 200, **args})
    expected = [t["id"] for t in served_tests(pid) if keep(t)]
    assert expected, "the filter must select something to mean anything"
    assert [r["id"] for r in data["tests"]] == expected
    assert data["pagination"]["total"] == len(expected)


@pytest.mark.anyio
async def test_list_tests_date_filters_use_the_utc_day_of_end_at_not_the_local_one(db):
    acc = make_account()
    pid = P
    crossing = next(t for t in served_tests(pid) if t["end_at"][:10] != utc(t["end_at"])[:10])
    utc_day, local_day = utc(crossing["end_at"])[:10], crossing["end_at"][:10]
    async with mcp_client(acc.handler) as client:
        on_utc_day = await ok(client, "list_tests", {"product_id": pid, "start_date": utc_day, "end_date": utc_day})
        on_local_day = await ok(client, "list_tests", {"product_id": pid, "start_date": local_day,
                                                       "end_date": local_day})
    assert crossing["id"] in [r["id"] for r in on_utc_day["tests"]]
    assert crossing["id"] not in [r["id"] for r in on_local_day["tests"]]


@pytest.mark.anyio
async def test_get_test_status_summarises_bugs_by_status_severity_type_reason_and_rates(db):
    acc = make_account()
    pid = P
    # an archived test with many bugs: rejected ones (with reasons) and auto-accepted ones
    test = max((t for t in served_tests(pid) if t["status"] == "archived"), key=lambda t: len(served_bugs(t["id"])))
    bugs = served_bugs(test["id"])
    assert {"rejected", "auto_accepted", "accepted"} <= {shown_status(b) for b in bugs}
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "get_test_status", {"test_id": test["id"]})
    shown = data["test"]
    assert data["warning"] is None
    assert {k: shown[k] for k in ("id", "title", "status", "review_status", "testing_type", "start_at", "end_at",
                                  "goal", "instructions", "out_of_scope", "environment", "created_by")} == {
        "id": test["id"], "title": test["title"], "status": "archived", "review_status": test["review_status"],
        "testing_type": shown_testing_type(test["testing_type"]), "start_at": utc(test["start_at"]),
        "end_at": utc(test["end_at"]), "goal": test["goal_text"], "instructions": test["instructions_text"],
        "out_of_scope": test["out_of_scope_text"], "environment": test["test_environment"]["title"],
        "created_by": test["created_by"]}
    assert shown["product"] == {"id": pid, "name": acc.products_json()[0]["name"]}
    assert [f["feature_id"] for f in shown["features"]] == [f["feature_id"] for f in test["features"]]
    assert data["bug_summary"] == bug_summary(bugs)
    assert [b["id"] for b in data["recent_bugs"]] == newest_first(bugs)[:10]


@pytest.mark.anyio
async def test_get_test_status_of_a_test_without_bugs_gives_null_rates_and_unknown_health(db):
    acc = make_account()
    test = next(t for t in served_tests(P) if t["status"] == "cancelled")
    assert served_bugs(test["id"]) == []
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "get_test_status", {"test_id": test["id"]})
    assert data["bug_summary"]["total"] == 0
    assert data["bug_summary"]["rates"] == dict.fromkeys(
        ("active_acceptance_rate", "auto_acceptance_rate", "overall_acceptance_rate", "rejection_rate",
         "review_rate"))
    assert set(data["bug_summary"]["health"].values()) == {"unknown"}
    assert data["recent_bugs"] == []


@pytest.mark.parametrize("args, keep", [
    ({"status": "open"}, lambda b: b["status"] == "forwarded"),
    ({"status": ["forwarded"]}, lambda b: b["status"] == "forwarded"),
    ({"status": "accepted"}, lambda b: b["status"] == "accepted" and not b["auto_accepted"]),
    ({"status": "auto_accepted"}, lambda b: b["status"] == "accepted" and b["auto_accepted"]),
    ({"status": "rejected", "rejection_reason": "not_reproducible,known_bug"},
     lambda b: reason_of(b) in ("not_reproducible", "known_bug")),
    ({"severity": ["critical"]}, lambda b: b["severity"] == "critical"),
    ({"bug_type": "visual,content"}, lambda b: b["severity"] in ("visual", "content")),
    ({"bug_type": "functional", "known": True}, lambda b: b["severity"] in ("low", "high", "critical") and b["known"]),
    ({"known": False, "severity": "custom"}, lambda b: not b["known"] and b["severity"] == "custom"),
    ({"start_date": "2026-06-01", "end_date": "2026-06-30"},
     lambda b: "2026-06-01T00:00:00Z" <= utc(b["reported_at"]) < "2026-07-01T00:00:00Z"),
], ids=["open", "forwarded-is-open", "accepted-not-auto", "auto-accepted", "reasons", "critical", "types",
        "known-functional", "new-custom", "reported-in-june"])
@pytest.mark.anyio
async def test_list_bugs_of_a_product_filters_like_the_served_bugs_newest_report_first(db, args, keep):
    acc = make_account()
    pid = P
    async with mcp_client(acc.handler) as client:
        rows = await all_pages(client, "list_bugs", {"product_ids": [pid], **args}, "bugs")
    served = [b for b in bugs_of_product(pid) if keep(b)]
    assert served, "the filter must select something to mean anything"
    assert [r["id"] for r in rows] == newest_first(served)
    truth = {b["id"]: b for b in served}
    for row in rows:
        bug = truth[row["id"]]
        assert (row["status"], row["severity"], row["bug_type"], row["known"], row["rejection_reason"],
                row["reported_at"], row["tester"], row["test"]["id"]) == (
            shown_status(bug), bug["severity"], shown_type(bug["severity"]), bug["known"], reason_of(bug),
            utc(bug["reported_at"]), bug["author"]["name"], bug["test"]["id"])


@pytest.mark.anyio
async def test_list_bugs_matches_the_tester_name_case_insensitively(db):
    acc = make_account()
    pid = P
    served = bugs_of_product(pid)
    tester = collections.Counter(b["author"]["name"] for b in served).most_common(1)[0][0]
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "list_bugs", {"product_ids": str(pid), "tester": tester.upper(), "per_page": 200})
    assert [r["id"] for r in data["bugs"]] == newest_first([b for b in served if b["author"]["name"] == tester])


@pytest.mark.parametrize("spelling", ["list", "comma-string", "comma-string-with-spaces", "json-string"])
@pytest.mark.anyio
async def test_list_bugs_takes_test_ids_as_a_json_list_or_a_comma_string(db, spelling):
    acc = make_account()
    a, b = [t for t in acc.test_ids(P) if served_bugs(t)][5:7]
    value = {"list": [a, b], "comma-string": f"{a},{b}", "comma-string-with-spaces": f" {a} , {b} ",
             "json-string": json.dumps([a, b])}[spelling]
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "list_bugs", {"test_ids": value, "per_page": 3})
    served = served_bugs(a) + served_bugs(b)
    assert data["pagination"] == {"page": 1, "per_page": 3, "total": len(served), "has_more": True}
    assert [r["id"] for r in data["bugs"]] == newest_first(served)[:3]


@pytest.mark.anyio
async def test_get_bug_returns_steps_results_devices_comments_and_the_rejection_reason(db):
    acc = make_account()
    served = bugs_of_product(P)
    rejected = next(b for b in served if b["status"] == "rejected" and len(b["comments"]) == 2)
    auto = next(b for b in served if b["status"] == "accepted" and b["auto_accepted"])
    async with mcp_client(acc.handler) as client:
        shown = (await ok(client, "get_bug", {"bug_id": rejected["id"]}))["bug"]
        shown_auto = (await ok(client, "get_bug", {"bug_id": auto["id"]}))["bug"]
    device = rejected["devices"][0]
    assert shown == {
        "id": rejected["id"], "title": rejected["title"], "test": rejected["test"],
        "product_id": P, "feature_id": rejected["feature"]["id"], "status": "rejected",
        "severity": rejected["severity"], "bug_type": shown_type(rejected["severity"]), "known": rejected["known"],
        "rejection_reason": reason_of(rejected), "reported_at": utc(rejected["reported_at"]),
        "tester": rejected["author"]["name"], "platform": device["operating_system"]["name"],
        "changed_at": shown["changed_at"], "steps": rejected["steps"],
        "expected_result": rejected["expected_result"] or None, "actual_result": rejected["actual_result"] or None,
        "feature": {"id": rejected["feature"]["id"], "title": rejected["feature"]["title"]},
        "devices": [{"category": device["category"]["name"], "device": device["device"]["name"],
                     "operating_system": device["operating_system"]["name"],
                     "os_version": device["operating_system_version"]["name"],
                     "browsers": [x["name"] for x in device["browsers"]]}],
        "comments": [{"author": c["author"]["name"], "body": c["body"]} for c in rejected["comments"]],
        "attachments": [a["url"] for a in rejected["attachments"]], "exported": False, "exported_at": None,
        "language": rejected["language"], "location": rejected["location"]}
    assert reason_of(rejected) in REASON_TEXT
    assert (shown_auto["status"], shown_auto["rejection_reason"]) == ("auto_accepted", None)


@pytest.mark.parametrize("product_index", [0, 1], ids=["without-sections", "with-sections"])
@pytest.mark.anyio
async def test_list_features_counts_tests_bugs_and_rejected_bugs_per_feature(db, product_index):
    acc = make_account()
    pid = acc.product_ids()[product_index]
    tests = served_tests(pid)
    bugs = bugs_of_product(pid)
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "list_features", {"product_id": pid})
    expected = [{"id": f["id"], "title": f["title"], "description": f["description"], "howtofind": f["howtofind"],
                 "user_stories": f["user_stories"],
                 "tests": sum(any(x["feature_id"] == f["id"] for x in t["features"]) for t in tests),
                 "bugs": sum(b["feature"]["id"] == f["id"] for b in bugs),
                 "rejected_bugs": sum(b["feature"]["id"] == f["id"] and b["status"] == "rejected" for b in bugs)}
                for f in sorted(acc.features_of(pid), key=lambda f: (f["title"], f["id"]))]
    assert data["total"] == len(expected)
    assert [{k: v for k, v in f.items() if k != "synced_at"} for f in data["features"]] == expected


@pytest.mark.parametrize("search", ["IN", "login", "so that I", "&", "%", "_", "\\", "[", '", "'])
@pytest.mark.anyio
async def test_list_features_search_matches_title_or_user_story_text_literally(db, search):
    acc = make_account()
    pid = PIDS[2]
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "list_features", {"product_id": pid, "search": search})
    needle = search.lower()
    expected = [f["id"] for f in sorted(acc.features_of(pid), key=lambda f: (f["title"], f["id"]))
                if needle in f["title"].lower() or any(needle in story.lower() for story in f["user_stories"])]
    assert [f["id"] for f in data["features"]] == expected


@pytest.mark.anyio
async def test_quality_report_covers_executed_tests_by_default_and_matches_the_five_rates(db):
    acc = make_account()
    pid = P
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "get_quality_report", {"product_ids": [pid]})
    in_scope = [t for t in served_tests(pid) if t["status"] in EXECUTED]
    bugs = [b for t in in_scope for b in served_bugs(t["id"])]
    assert data["scope"]["statuses"] == list(EXECUTED)
    assert data["tests"]["total"] == len(in_scope) < 120
    assert data["tests"]["by_status"] == dict(collections.Counter(t["status"] for t in in_scope))
    assert data["tests"]["by_testing_type"] == dict(
        collections.Counter(shown_testing_type(t["testing_type"]) for t in in_scope))
    assert data["bugs"] == bug_summary(bugs)
    assert data["per_product"] is None
    assert data["thresholds"]["rejection_rate"] == {"warning": 0.2, "critical": 0.35, "bad_when": "above"}
    # top_tests: at most 20, the most bugs first, while the totals above cover every test in scope
    ranked = sorted(in_scope, key=lambda t: (len(served_bugs(t["id"])), utc(t["end_at"])), reverse=True)
    assert len(in_scope) > 20
    assert [t["id"] for t in data["top_tests"]] == [t["id"] for t in ranked[:20]]
    top = data["top_tests"][0]
    top_bugs = served_bugs(top["id"])
    assert {k: top[k] for k in ("bugs", "open", "accepted", "auto_accepted", "rejected", "critical")} == {
        "bugs": len(top_bugs), **{k: v for k, v in bug_counts(top_bugs).items() if k != "total"}}
    assert top["rates"] == bug_rates(top_bugs)


@pytest.mark.anyio
async def test_quality_report_of_several_products_adds_one_block_per_product(db):
    acc = make_account()
    pids = acc.product_ids()
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "get_quality_report", {"product_ids": ",".join(map(str, pids)),
                                                       "start_date": "2026-01-01", "end_date": "2026-10-31"})
    blocks = []
    everything = []
    for p in acc.products_json():
        scope = [t for t in served_tests(p["id"]) if t["status"] in EXECUTED
                 and "2026-01-01T00:00:00Z" <= utc(t["end_at"]) < "2026-11-01T00:00:00Z"]
        bugs = [b for t in scope for b in served_bugs(t["id"])]
        everything += bugs
        summary = bug_summary(bugs)
        blocks.append({"product_id": p["id"], "name": p["name"], "tests": len(scope), "bugs": len(bugs),
                       "by_status": summary["by_status"], "rates": summary["rates"], "health": summary["health"]})
    assert data["per_product"] == blocks
    assert data["tests"]["total"] == sum(b["tests"] for b in blocks)
    assert data["bugs"] == bug_summary(everything)


@pytest.mark.anyio
async def test_quality_report_of_a_scope_without_bugs_reports_null_rates_not_zero(db):
    acc = make_account()
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "get_quality_report", {"product_ids": [P], "statuses": "cancelled"})
    cancelled = [t for t in served_tests(P) if t["status"] == "cancelled"]
    assert data["tests"]["total"] == len(cancelled) > 0
    assert data["bugs"]["total"] == 0
    assert set(data["bugs"]["rates"].values()) == {None}
    assert set(data["bugs"]["health"].values()) == {"unknown"}


@pytest.mark.anyio
async def test_query_metrics_pivots_bugs_by_one_dimension(db):
    acc = make_account()
    bugs = [b for pid in acc.product_ids() for b in bugs_of_product(pid)]
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "query_metrics", {"metrics": ["bug_count", "rejection_rate", "auto_acceptance_rate"],
                                                  "dimensions": ["severity"]})
    expected = []
    for severity, count in collections.Counter(b["severity"] for b in bugs).most_common():
        r = bug_rates([b for b in bugs if b["severity"] == severity])
        expected.append({"severity": severity, "bug_count": count, "rejection_rate": r["rejection_rate"],
                         "auto_acceptance_rate": r["auto_acceptance_rate"]})
    assert data["rows"] == expected
    assert (data["metrics"], data["dimensions"], data["total_rows"]) == (
        ["bug_count", "rejection_rate", "auto_acceptance_rate"], ["severity"], 6)


@pytest.mark.anyio
async def test_query_metrics_pivots_by_two_dimensions_with_product_names(db):
    acc = make_account()
    names = {p["id"]: p["name"] for p in acc.products_json()}
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "query_metrics", {"metrics": "bug_count,test_count", "dimensions": "product,bug_status",
                                                  "limit": 1000})
    cells: dict = collections.defaultdict(lambda: {"bugs": 0, "tests": set()})
    for pid in acc.product_ids():
        for b in bugs_of_product(pid):
            cell = cells[(pid, shown_status(b))]
            cell["bugs"] += 1
            cell["tests"].add(b["test"]["id"])
    got = {(r["product"], r["bug_status"]): (r["bug_count"], r["test_count"], r["product_name"]) for r in data["rows"]}
    assert got == {k: (v["bugs"], len(v["tests"]), names[k[0]]) for k, v in cells.items()}
    counts = [r["bug_count"] for r in data["rows"]]
    assert counts == sorted(counts, reverse=True)


@pytest.mark.anyio
async def test_query_metrics_counts_tests_by_a_test_dimension_including_tests_without_bugs(db):
    acc = make_account()
    tests = [t for pid in acc.product_ids() for t in served_tests(pid)]
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "query_metrics", {"metrics": ["test_count", "bugs_per_test"],
                                                  "dimensions": ["test_status"], "sort_by": "test_status"})
    expected = []
    for status in sorted({t["status"] for t in tests}):
        scope = [t for t in tests if t["status"] == status]
        nbugs = sum(len(served_bugs(t["id"])) for t in scope)
        expected.append({"test_status": status, "test_count": len(scope),
                         "bugs_per_test": round(nbugs / len(scope), 3)})
    assert data["rows"] == expected


@pytest.mark.anyio
async def test_query_metrics_pivots_by_feature_month_and_quarter_in_utc(db):
    acc = make_account()
    features = {f["id"]: f["title"] for f in acc.features_of(P)}
    tests, bugs = served_tests(P), bugs_of_product(P)
    only_p = {"filters": {"product_ids": [P]}, "limit": 1000}
    async with mcp_client(acc.handler) as client:
        by_feature = await ok(client, "query_metrics", {"metrics": ["test_count", "bug_count"],
                                                        "dimensions": ["feature"], **only_p})
        by_month = await ok(client, "query_metrics", {"metrics": "test_count,bug_count", "dimensions": "month",
                                                      "start_date": "2026-01-01", "end_date": "2026-06-30",
                                                      "sort_by": "month", **only_p})
        by_quarter = await ok(client, "query_metrics", {"metrics": ["test_count"], "dimensions": ["quarter"],
                                                        "sort_by": "quarter", **only_p})
    assert {r["feature"]: (r["feature_name"], r["test_count"], r["bug_count"]) for r in by_feature["rows"]} == {
        f: (title, sum(any(x["feature_id"] == f for x in t["features"]) for t in tests),
            sum(b["feature"]["id"] == f for b in bugs)) for f, title in features.items()}

    def grouped(key, scope):
        groups = collections.defaultdict(list)
        for t in scope:
            groups[key(utc(t["end_at"]))].append(t)
        return sorted(groups.items())

    half = [t for t in tests if "2026-01-01" <= utc(t["end_at"]) < "2026-07-01"]
    assert by_month["rows"] == [{"month": month, "test_count": len(group),
                                 "bug_count": sum(len(served_bugs(t["id"])) for t in group)}
                                for month, group in grouped(lambda end: end[:7], half)]
    assert by_quarter["rows"] == [{"quarter": quarter, "test_count": len(group)} for quarter, group in
                                  grouped(lambda end: f"{end[:4]}-Q{(int(end[5:7]) + 2) // 3}", tests)]


@pytest.mark.anyio
async def test_query_metrics_returns_at_most_limit_rows_and_says_how_many_there_are(db):
    acc = make_account()
    testers = {b["author"]["name"] for pid in acc.product_ids() for b in bugs_of_product(pid)}
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "query_metrics", {"metrics": ["bug_count"], "dimensions": ["tester"], "limit": 5})
    assert len(data["rows"]) == 5
    assert data["total_rows"] == len(testers) > 5


@pytest.mark.anyio
async def test_query_metrics_by_feature_names_each_features_product_and_counts_its_own_tests_bugs(db):
    acc = make_account()
    owner = {f["id"]: (pid, NAMES[pid], f["title"]) for pid in PIDS for f in acc.features_of(pid)}
    async with mcp_client(acc.handler) as client:
        by_feature = await ok(client, "query_metrics", {"metrics": ["test_count", "bug_count", "rejection_rate"],
                                                        "dimensions": ["feature"], "limit": 1000})
        by_pair = await ok(client, "query_metrics", {"metrics": ["bug_count", "active_testers"],
                                                     "dimensions": ["feature", "severity"], "limit": 1000})
    tests = [t for pid in PIDS for t in served_tests(pid)]
    bugs = [b for pid in PIDS for b in bugs_of_product(pid)]
    expected = {}
    for f, (pid, name, title) in owner.items():
        mine = [b for b in bugs if b["feature"]["id"] == f]
        expected[f] = {"feature": f, "feature_name": title, "product_id": pid, "product_name": name,
                       "test_count": sum(any(x["feature_id"] == f for x in t["features"]) for t in tests),
                       "bug_count": len(mine), "rejection_rate": bug_rates(mine)["rejection_rate"]}
    assert {r["feature"]: r for r in by_feature["rows"]} == expected
    titles = collections.Counter(title for _, _, title in owner.values())
    assert any(n > 1 for n in titles.values())  # same-named features of two products: told apart by product
    cells = collections.defaultdict(list)
    for b in bugs:
        cells[(b["feature"]["id"], b["severity"])].append(b)
    assert {(r["feature"], r["severity"]): (r["bug_count"], r["active_testers"], r["product_id"])
            for r in by_pair["rows"]} == {
        k: (len(v), len({b["author"]["name"] for b in v}), owner[k[0]][0]) for k, v in cells.items()}



@pytest.mark.anyio
async def test_query_metrics_counts_a_feature_listed_twice_by_one_test_once(env, monkeypatch):
    acc = make_account()
    twice = {t["id"] for t in served_tests(P)[:40] if t["features"]}

    def handler(request):  # these tests list their first feature again, as a second snapshot
        response = acc.handler(request)
        if request.url.path.endswith(f"/products/{P}/exploratory_tests") and response.status_code == 200:
            body = response.json()
            for test in body["exploratory_tests"]:
                if test["id"] in twice:
                    test["features"].append({**test["features"][0], "id": test["features"][0]["id"] + 7})
            return httpx.Response(200, json=body)
        return response

    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    async with mcp_client(handler) as client:
        await ok(client, "sync_data", {"mode": "incremental"})
        data = await ok(client, "query_metrics", {"metrics": ["test_count", "bug_count", "rejection_rate"],
                                                  "dimensions": ["feature"], "filters": {"product_ids": [P]}})
    tests, bugs = served_tests(P), bugs_of_product(P)
    assert {r["feature"]: (r["test_count"], r["bug_count"], r["rejection_rate"]) for r in data["rows"]} == {
        f["id"]: (sum(any(x["feature_id"] == f["id"] for x in t["features"]) for t in tests),
                  len(mine := [b for b in bugs if b["feature"]["id"] == f["id"]]), bug_rates(mine)["rejection_rate"])
        for f in acc.features_of(P)}


RATE_METRICS = ["test_count", "bug_count", "bugs_per_test", "active_acceptance_rate", "auto_acceptance_rate",
                "overall_acceptance_rate", "rejection_rate", "review_rate"]
TEST_KEYS = {"product": lambda t: t["product_id"], "month": lambda t: t["end_at"] and t["end_at"][:7],
             "week": lambda t: t["end_at"] and datetime.strptime(t["end_at"], "%Y-%m-%dT%H:%M:%SZ").strftime("%Y-W%W"),
             "quarter": lambda t: t["end_at"] and f"{t['end_at'][:4]}-Q{(int(t['end_at'][5:7]) + 2) // 3}",
             "test_status": lambda t: t["status"], "testing_type": lambda t: t["testing_type"]}
BUG_KEYS = {"severity": "severity", "bug_type": "bug_type", "bug_status": "status", "tester": "tester",
            "platform": "platform", "rejection_reason": "rejection_reason", "known": "known"}


@pytest.mark.anyio
async def test_query_metrics_over_every_product_counts_each_stored_test_and_bug_once(db):
    """Pivots with no condition on tests (every product, no dates) by test columns or by bug columns,
    against the same figures reckoned here from the stored rows."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    tests = {r["id"]: dict(r) for r in conn.execute("SELECT id, product_id, status, testing_type, end_at FROM tests")}
    bugs = [dict(r) for r in conn.execute(f"SELECT test_id, {', '.join(set(BUG_KEYS.values()))} FROM bugs")]
    names = dict(conn.execute("SELECT id, name FROM products"))
    conn.close()
    shapes = [[d] for d in [*TEST_KEYS, *BUG_KEYS]] + [["product", "month"], ["week", "test_status"],
                                                        ["tester", "bug_status"], ["platform", "known"]]
    async with mcp_client(make_account().handler) as client:
        answers = [await ok(client, "query_metrics", {"metrics": RATE_METRICS, "dimensions": dims, "limit": 1000})
                   for dims in shapes]
    for dims, data in zip(shapes, answers):
        cells = collections.defaultdict(lambda: (set(), []))
        if dims[0] in TEST_KEYS:
            for t in tests.values():
                cells[tuple(TEST_KEYS[d](t) for d in dims)][0].add(t["id"])
            for b in bugs:
                cells[tuple(TEST_KEYS[d](tests[b["test_id"]]) for d in dims)][1].append(b)
        else:
            for b in bugs:
                cell = cells[tuple(b[BUG_KEYS[d]] for d in dims)]
                cell[0].add(b["test_id"])
                cell[1].append(b)
        expected = {}
        for cell, (ids, mine) in cells.items():
            status = collections.Counter(b["status"] for b in mine)
            row = {d: bool(v) if d == "known" else v for d, v in zip(dims, cell)}
            row.update({"test_count": len(ids), "bug_count": len(mine),
                        "bugs_per_test": round(len(mine) / len(ids), 3),
                        **rates(status["accepted"], status["auto_accepted"], status["rejected"], len(mine))})
            if "product" in dims:
                row["product_name"] = names[row["product"]]
            expected[tuple(row[d] for d in dims)] = row
        assert {tuple(r[d] for d in dims): r for r in data["rows"]} == expected, dims
        assert data["total_rows"] == len(expected)

METRIC_SHAPES = [[d] for d in tm.METRIC_DIMENSIONS] + [
    [a, b] for a in tm.METRIC_DIMENSIONS for b in tm.METRIC_DIMENSIONS if a != b]


def test_every_one_product_metrics_pivot_reads_that_products_tests_and_their_bugs_through_indexes(db):
    """EXPLAIN QUERY PLAN of every pivot shape (each dimension alone and every ordered pair, every
    metric or the common three, with and without dates and a bug filter) scoped to one product: the tests come from a
    product index, the bugs from the covering per-test index; never a scan of bugs, never bugs by
    feature (which reads that feature's bugs of every test) nor a bug row (its raw JSON)."""
    conn = sqlite3.connect(db)
    filters = [({"product_ids": [P]}, None, None), ({"product_ids": [P]}, date(2026, 1, 1), date(2026, 6, 30)),
               ({"product_ids": [P], "severities": ["high"], "testers": ["x"]}, None, date(2026, 6, 30))]
    for dims, metrics, (scope, start, end) in itertools.product(
            METRIC_SHAPES, [list(tm.METRICS), ["test_count", "bug_count", "rejection_rate"]], filters):
        plan = [row[3] for sql, args in tm.metrics_queries(metrics, dims, scope, start, end)
                for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
        tests = [line for line in plan if re.match(r"(SCAN|SEARCH) t\b", line)]
        bugs = [line for line in plan if re.match(r"(SCAN|SEARCH) b\b", line)]
        assert tests and all(re.match(r"SEARCH t USING (COVERING )?INDEX tests_product_\w+ \(product_id=\?", line)
                             for line in tests), (dims, scope, plan)
        assert bugs and all(line.startswith("SEARCH b USING COVERING INDEX bugs_test_facets (test_id=?")
                            for line in bugs), (dims, scope, plan)
    conn.close()



def test_a_pivot_over_every_product_reads_the_bugs_once_in_index_order(db):
    """EXPLAIN QUERY PLAN of the pivots with no condition on tests (every product, no dates) by bug
    columns alone or by test columns alone: bugs_test_facets is read once, in its order; never a
    probe of each bug's test, nor counts sought test by test."""
    conn = sqlite3.connect(db)
    of_bugs = [d for d in tm.METRIC_DIMENSIONS if tm.METRIC_DIMENSIONS[d][0].startswith("b.")]
    of_tests = [d for d in tm.METRIC_DIMENSIONS if d != "feature" and d not in of_bugs]
    shapes = [(dims, filters) for group in (of_bugs, of_tests)
              for dims in [[d] for d in group] + [[a, b] for a in group for b in group if a != b]
              for filters in ([{}, {"severities": ["high"]}] if group is of_bugs else [{}])]
    for (dims, filters), metrics in itertools.product(shapes, [RATE_METRICS, ["test_count", "bug_count",
                                                                              "rejection_rate"]]):
        plan = [row[3] for sql, args in tm.metrics_queries(metrics, dims, filters, None, None)
                for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
        assert [line for line in plan if re.match(r"(SCAN|SEARCH) b\b", line)] == [
            "SCAN b USING COVERING INDEX bugs_test_facets"], (dims, filters, plan)
    conn.close()

@pytest.mark.anyio
async def test_search_finds_a_title_word_with_bm25_ranking_and_filters(db):
    acc = make_account()
    pid = P
    async with mcp_client(acc.handler) as client:
        bugs = await ok(client, "search", {"query": "untranslated", "entities": "bug", "product_ids": [pid],
                                           "limit": 200})
        tests = await ok(client, "search", {"query": "Regression", "entities": ["test"], "product_ids": str(pid),
                                            "limit": 200})
        quoted = await ok(client, "search", {"query": '"Regression"', "entities": ["test"], "product_ids": str(pid),
                                             "limit": 200})
    expected_bugs = {b["id"] for b in bugs_of_product(pid) if "untranslated" in b["title"].lower()}
    assert {r["id"] for r in bugs["results"]} == expected_bugs
    assert {(r["entity"], r["product_id"]) for r in bugs["results"]} == {("bug", pid)}
    expected_tests = {t["id"] for t in served_tests(pid) if "regression" in t["title"].lower()}
    assert {r["id"] for r in tests["results"]} == expected_tests
    assert quoted["results"] == tests["results"]
    scores = [r["score"] for r in bugs["results"]]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0


@pytest.mark.anyio
async def test_search_ranks_the_newest_matches_of_a_kind_says_so_and_completes_a_partial_word(db, monkeypatch):
    acc = make_account()
    monkeypatch.setattr(tm, "SEARCH_CANDIDATES", 5)
    async with mcp_client(acc.handler) as client:
        capped = await ok(client, "search", {"query": "untranslated", "entities": ["bug"], "limit": 200})
        partial = await ok(client, "search", {"query": "untransl", "entities": ["bug"], "product_ids": [P],
                                              "limit": 3})
    matching = sorted(b["id"] for pid in acc.product_ids() for b in bugs_of_product(pid)
                      if "untranslated" in b["title"].lower())
    assert len(matching) > 5
    assert sorted(r["id"] for r in capped["results"]) == matching[-5:]
    assert capped["note"] == ("more than 5 bug matches: the newest 5 of each were ranked; add words or "
                              "product_ids to reach older ones")
    in_product = {b["id"] for b in bugs_of_product(P) if "untranslated" in b["title"].lower()}
    assert len(partial["results"]) == 3 and {r["id"] for r in partial["results"]} <= in_product


def test_a_product_scoped_search_steps_through_that_products_matches_only(db):
    """The product is matched in the full-text index: other products' matches (here newer and more
    numerous) cost a product-scoped search nothing, and never stand in for its own."""
    conn = tm.connect(db)
    word = "untranslated"
    steps = collections.Counter()

    def scoped_search() -> set[int]:
        steps.clear()
        conn.set_progress_handler(lambda: steps.update(["op"]), 1)
        found = tm.search_index(conn, word, ["bug"], [P], 200)
        conn.set_progress_handler(None, 1)
        assert {r["product_id"] for r in found["results"]} == {P} and found["capped"] == []
        return {r["id"] for r in found["results"]}

    mine = {b["id"] for b in bugs_of_product(P) if word in b["title"].lower()}
    others = sum(word in b["title"].lower() for pid in PIDS if pid != P for b in bugs_of_product(pid))
    assert len(mine) > 10 and others > len(mine)
    assert scoped_search() == mine
    with_others = steps["op"]
    conn.execute("DELETE FROM search_fts WHERE rowid IN (SELECT (4 << 40) | id FROM bugs WHERE product_id != ?)",
                 (P,))
    assert scoped_search() == mine
    assert with_others <= 1.2 * steps["op"], (with_others, steps["op"])
    conn.close()


@pytest.mark.anyio
async def test_a_product_scoped_search_weighs_a_word_by_that_products_rows_alone(db):
    """A product's search weighs each word by its rows in that product: other products ceasing to
    use the word (row lengths kept) leave its answer and scores exactly as they were. (FTS5's
    bm25() counts a word over the whole index, a cost that grew with every other product.)"""
    acc = make_account()
    word = "untranslated"
    scoped = {"query": word, "product_ids": [P], "limit": 200}
    async with mcp_client(acc.handler) as client:
        before = await ok(client, "search", scoped)
        everywhere = await ok(client, "search", {"query": word, "limit": 200})
        with contextlib.closing(sqlite3.connect(db)) as conn:  # the word becomes another word
            rowids = [r[0] for r in conn.execute(
                "SELECT rowid FROM search_fts WHERE search_fts MATCH ? AND product_id != ?",
                (tm.fts_query(word, prefix=False), P))]
            conn.executemany(
                "UPDATE search_fts SET title = replace(replace(title, 'untranslated', 'zzzzzzzzzzzz'), "
                "'Untranslated', 'Zzzzzzzzzzzz'), body = replace(replace(body, 'untranslated', "
                "'zzzzzzzzzzzz'), 'Untranslated', 'Zzzzzzzzzzzz') WHERE rowid = ?",
                [(r,) for r in rowids])
            conn.commit()
        after = await ok(client, "search", scoped)
        elsewhere_after = await ok(client, "search", {"query": word, "limit": 200})
    assert {r["product_id"] for r in everywhere["results"]} == set(PIDS) and len(rowids) > 20
    assert {r["product_id"] for r in elsewhere_after["results"]} == {P}
    assert len(before["results"]) > 10 and min(r["score"] for r in before["results"]) > 0
    assert after == {**before, "data_as_of": after["data_as_of"]}


def test_a_product_scoped_search_ranks_one_word_in_fts5s_bm25_order(db):
    """One word in one product: the order of FTS5's bm25() with the title weighted 10x (a title
    match first, then by how often and how densely the row has the word), newest first on a tie."""
    with contextlib.closing(tm.connect(db)) as conn:
        answers = {}
        for word, entities in (("data", []), ("filter", []), ("untranslated", ["bug"]),
                               ("login", ["bug", "test"])):
            answers[word] = [(r["entity"], r["id"]) for r in tm.search_index(
                conn, word, entities, [P], 200)["results"]]
            match = f"{tm.fts_query(word, prefix=False)} AND product_id : {P}"
            expected = [(tm.SEARCH_ENTITIES[(r[0] >> 40) - 1], r[0] & tm.FTS_ID_MASK)
                        for r in conn.execute(
                "SELECT rowid FROM search_fts WHERE search_fts MATCH ? "
                "ORDER BY bm25(search_fts, 10.0, 1.0, 0.0, 0.0), rowid DESC", (match,))]
            expected = [e for e in expected if not entities or e[0] in entities]
            assert len(expected) > 20 and answers[word] == expected, word
        body_only = conn.execute(  # the one row with "data" in its body but not in its title
            "SELECT entity, rowid & ? FROM search_fts WHERE search_fts MATCH ?",
            (tm.FTS_ID_MASK, f'body : "data" NOT title : "data" AND product_id : {P}')).fetchall()
    assert answers["data"][-1:] == [tuple(r) for r in body_only]


@pytest.mark.parametrize("query", [
    "login OR checkout", "NEAR(login checkout)", "NEAR(", "check*", "*", '"', '"unbalanced', "title:login",
    "login AND", "-login", "^login", "(((", "login)", "🐛", "🐛 checkout", "", "   ", "\x00",
    "' OR 1=1 --", "x'; DROP TABLE bugs; --", "SELECT * FROM bugs", "bugs; DELETE FROM tests",
    "%", "_", "\\", "ß", "Ünïcödé", "a" * 500,
])
@pytest.mark.anyio
async def test_search_treats_operators_quotes_emoji_and_sql_as_plain_text(db, query):
    acc = make_account()
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "search", {"query": query})
        stats = await ok(client, "get_database_stats")
    assert stats["counts"]["bugs"] == len(acc.bug_ids())  # nothing was dropped or deleted
    if not re.search(r"\w", query):
        assert data["results"] == []
        assert data["note"] == "the query has no searchable words; try words from a title"
    else:
        assert data["note"] is None


@pytest.mark.anyio
async def test_get_database_stats_counts_what_the_account_serves(db):
    acc = make_account()
    async with mcp_client(acc.handler) as client:
        data = await ok(client, "get_database_stats")
        size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
    ends = [utc(t["end_at"]) for pid in acc.product_ids() for t in served_tests(pid)]
    assert data["counts"] == {"products": 3, "features": sum(len(acc.features_of(p)) for p in acc.product_ids()),
                              "tests": 360, "bugs": len(acc.bug_ids()), "sync_runs": 1, "problematic_events": 0}
    assert (data["oldest_test_end"], data["newest_test_end"]) == (min(ends), max(ends))
    assert (data["path"], data["size_bytes"]) == (str(db), size)
    assert {p["id"]: (p["tests"], p["bugs"], p["last_status"]) for p in data["products"]} == {
        pid: (120, len(acc.bug_ids(product_id=pid)), "success") for pid in acc.product_ids()}


@pytest.mark.anyio
async def test_get_sync_history_lists_runs_newest_first_up_to_the_limit(db):
    acc = make_account()
    async with mcp_client(acc.handler) as client:
        await ok(client, "sync_data", {})
        await ok(client, "sync_data", {"mode": "refresh", "product_ids": [P]})
        runs = (await ok(client, "get_sync_history"))["runs"]
        two = (await ok(client, "get_sync_history", {"limit": 2}))["runs"]
    assert [(r["id"], r["mode"], r["trigger"], r["status"]) for r in runs] == [
        (3, "refresh", "tool", "success"), (2, "incremental", "tool", "success"), (1, "incremental", "cli", "success")]
    assert (runs[2]["new_tests"], runs[2]["bugs"], runs[2]["products"]) == (360, len(acc.bug_ids()), 3)
    assert two == runs[:2]


@pytest.mark.slow
@pytest.mark.anyio
async def test_get_problematic_tests_names_the_position_a_poisoned_page_could_not_serve(env, monkeypatch):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    acc = make_account(products=2, tests_per_product=60)
    pid, other = acc.product_ids()
    order = acc.test_ids(pid)
    acc.poison_test(order[30])
    async with mcp_client(acc.handler) as client:
        run = (await ok(client, "sync_data", {}))["run"]
        events = (await ok(client, "get_problematic_tests"))["events"]
        mine = (await ok(client, "get_problematic_tests", {"product_id": pid}))["events"]
        theirs = (await ok(client, "get_problematic_tests", {"product_id": other}))["events"]
    assert run["status"] == "completed_with_problems"
    assert len(events) == 1
    event = events[0]
    assert {k: event[k] for k in ("product_id", "page", "per_page", "offset_start", "offset_end", "before_id",
                                  "after_id", "mapped_test_ids")} == {
        "product_id": pid, "page": 1, "per_page": 100, "offset_start": 30, "offset_end": 31,
        "before_id": order[29], "after_id": order[31], "mapped_test_ids": []}
    assert (event["before_end_at"], event["after_end_at"]) == (
        utc(acc.test_json(order[29])["end_at"]), utc(acc.test_json(order[31])["end_at"]))
    assert mine == events and theirs == []


###############################################################################
# The change log: get_changes against an account changed between two syncs
###############################################################################

def served_state(acc, product_id: int | None = None) -> dict:
    """What the account serves (of one product, or all), for a diff made without the module: tests by id
    (product, title, status, UTC start/end) and bugs by id (product, test, title, shown status, rejection
    reason, severity)."""
    tests, bugs = {}, {}
    for pid in [product_id] if product_id is not None else acc.product_ids():
        for tid in acc.test_ids(pid):
            t = acc.test_json(tid)
            tests[tid] = {"product_id": pid, "title": t["title"], "status": t["status"],
                          "dates": f"{utc(t['start_at']) or ''}/{utc(t['end_at']) or ''}"}
            for b in acc.bugs_of(tid):
                bugs[b["id"]] = {"product_id": pid, "test_id": tid, "title": b["title"], "status": shown_status(b),
                                 "reason": reason_of(b), "severity": b["severity"]}
    return {"tests": tests, "bugs": bugs}


def diff_states(before: dict, after: dict) -> set[tuple]:
    """The changes between two served states: (kind, product, test, bug, old, new, reason) each."""
    out = set()
    for tid, t in after["tests"].items():
        old = before["tests"].get(tid)
        if old is None:
            out.add(("test_new", t["product_id"], tid, None, None, t["status"], None))
            continue
        for key, kind in (("status", "test_status"), ("dates", "test_dates")):
            if old[key] != t[key]:
                out.add((kind, t["product_id"], tid, None, old[key], t[key], None))
    out |= {("test_deleted", t["product_id"], tid, None, t["status"], None, None)
            for tid, t in before["tests"].items() if tid not in after["tests"]}
    for bid, b in after["bugs"].items():
        old = before["bugs"].get(bid)
        if old is None:
            out.add(("bug_new", b["product_id"], b["test_id"], bid, None, b["status"], b["reason"]))
            continue
        if old["status"] != b["status"]:
            out.add(("bug_status", b["product_id"], b["test_id"], bid, old["status"], b["status"], b["reason"]))
        if old["severity"] != b["severity"]:
            out.add(("bug_severity", b["product_id"], b["test_id"], bid, old["severity"], b["severity"], None))
    return out


def as_tuple(change: dict) -> tuple:
    return (change["kind"], change["product_id"], change["test_id"], change.get("bug_id"), change.get("old"),
            change.get("new"), change.get("reason"))


def lively_account(**kw):
    """make_account() with a few more tests ending lately (locked: their bugs are still under review)."""
    acc = make_account(**{"products": 3, "tests_per_product": 120, "bugs_per_test": 4, **kw})
    for pid in acc.product_ids():
        acc.add_tests(pid, 4)
    return acc


def change_account(acc) -> None:
    """A week of a real account: new tests, tests starting, ending, archived (auto-acceptance), moved,
    deleted and cancelled; bugs reported, accepted, rejected with a reason, auto-accepted, re-rated."""
    first, second, third = acc.product_ids()[:3]

    def tests(pid, status):  # (test, its forwarded bugs), the most forwarded bugs first
        found = [(t, [b["id"] for b in acc.bugs_of(t) if b["status"] == "forwarded"]) for t in acc.test_ids(pid)
                 if acc.test_json(t)["status"] == status]
        return sorted(found, key=lambda tf: -len(tf[1]))

    (reviewed, forwarded), (archived, _), (moved, _) = tests(first, "locked")[:3]
    acc.review_bug(forwarded[0], "accepted")
    acc.review_bug(forwarded[1], "rejected", "known_bug")
    acc.set_test_status(archived, "archived")  # its forwarded bugs are accepted automatically
    acc.move_test(moved, datetime.fromisoformat(acc.test_json(moved)["end_at"]) - timedelta(days=2))
    acc.set_test_status(tests(first, "running")[0][0], "locked")
    acc.set_test_status(tests(first, "waiting")[0][0], "running")
    acc.add_tests(first, 2)
    (deleted, _), (reported, _), (rerated, _) = tests(second, "locked")[:3]
    acc.delete_test(deleted)
    acc.add_bugs(reported, 2)
    bug = acc.bugs_of(rerated)[0]
    acc.set_bug_severity(bug["id"], "low" if bug["severity"] == "critical" else "critical")
    acc.set_test_status(tests(second, "initialized")[0][0], "cancelled")
    forwarded = tests(third, "locked")[0][1]
    acc.review_bug(forwarded[0], "rejected", "not_reproducible")
    acc.review_bug(forwarded[1], "auto_accepted")


def answers(acc, *calls):
    """Tool answers for a test that runs the CLI too: (tool, args) gives the answer, (tool, args, key)
    every row under `key` of all pages."""
    async def ask():
        async with mcp_client(acc.handler) as client:
            return [await (all_pages(client, *call) if len(call) == 3 else ok(client, *call)) for call in calls]
    return asyncio.run(ask())


@pytest.fixture(scope="module")
def changes_synced(tmp_path_factory):
    """An account synced, changed (change_account) and synced again with --refresh, as the server's
    background refresh does: (database, account, served state before, after, UTC second before the
    second sync, after it)."""
    root = tmp_path_factory.mktemp("changes")
    acc = lively_account()
    with pytest.MonkeyPatch.context() as mp:
        path = clean_environment(mp, root)
        with restored_logging():
            assert tm.main(["sync"], transport=transport_for(acc.handler)) == 0
            before = served_state(acc)
            change_account(acc)
            started = tm.iso(datetime.now(timezone.utc))
            assert tm.main(["sync", "--refresh"], transport=transport_for(acc.handler)) == 0
            ended = tm.iso(datetime.now(timezone.utc) + timedelta(seconds=1))
        assert_matches_truth(path, acc)
    return path, acc, before, served_state(acc), started, ended


@pytest.fixture
def changed(env, changes_synced, monkeypatch):
    """`env` holding a copy of changes_synced's database (no background sync); the rest of it."""
    env.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(changes_synced[0], env)
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    return changes_synced


@pytest.mark.anyio
async def test_get_changes_lists_exactly_what_changed_between_two_syncs_newest_first_with_titles(changed):
    _, acc, before, after, started, ended = changed
    expected = diff_states(before, after)
    assert {kind for kind, *_ in expected} == set(tm.CHANGE_KINDS)  # the scenario makes every kind
    written = set(re.findall(r"'((?:test|bug)_[a-z]+)'", (HERE / "schema.sql").read_text()))
    assert written == set(tm.CHANGE_KINDS)  # ... which are all the triggers write
    async with mcp_client(acc.handler) as client:
        feed = await all_pages(client, "get_changes", {"since": "2000-01-01"}, "changes")
    assert sorted(map(as_tuple, feed), key=str) == sorted(expected, key=str)
    assert [c["seen_at"] for c in feed] == sorted((c["seen_at"] for c in feed), reverse=True)
    assert all(started <= c["seen_at"] <= ended for c in feed)
    names = {p["id"]: p["name"] for p in acc.products_json()}
    for c in feed:
        test = after["tests"].get(c["test_id"]) or before["tests"][c["test_id"]]
        assert (c["product"], c["test_title"]) == (names[c["product_id"]], test["title"])
        if "bug_id" in c:
            bug = after["bugs"][c["bug_id"]]
            assert (c["bug_title"], c["severity"]) == (bug["title"], bug["severity"])


def summary_of(changes: set[tuple], names: dict) -> list[dict]:
    """get_changes' summary computed from (kind, product, ...) tuples: per product by name."""
    out = {}
    for kind, pid, _, _, _, new, _ in changes:
        entry = out.setdefault(pid, {"product_id": pid, "product": names[pid], "total": 0, "by_kind": {}})
        entry["total"] += 1
        entry["by_kind"][kind] = entry["by_kind"].get(kind, 0) + 1
        if kind in ("test_status", "bug_status"):
            to = entry.setdefault(f"{kind}_to", {})
            to[new] = to.get(new, 0) + 1
    return sorted(out.values(), key=lambda e: e["product"])


@pytest.mark.anyio
async def test_get_changes_summarises_per_product_and_kind_and_pages_naming_the_next_call(changed):
    _, acc, before, after, _, _ = changed
    expected = diff_states(before, after)
    names = {p["id"]: p["name"] for p in acc.products_json()}
    async with mcp_client(acc.handler) as client:
        default = await client.call_tool("get_changes", {})
        whole = await ok(client, "get_changes", {"per_page": 200})
        pages = [await ok(client, "get_changes", {"page": n, "per_page": 40}) for n in (1, 2)]
    assert len(default.content[0].text.encode()) <= DEFAULT_ANSWER_MAX
    data = default.structured_content
    assert data["summary"] == summary_of(expected, names)
    assert data["pagination"] == {"page": 1, "per_page": 25, "total": len(expected), "has_more": True}
    assert data["notes"] == [f"1-25 of {len(expected)} shown; call get_changes again with page=2 and the "
                             f"same other arguments for more"]
    assert data["changes"] == whole["changes"][:25]
    assert pages[0]["changes"] + pages[1]["changes"] == whole["changes"][:80]
    assert all(page["summary"] == data["summary"] for page in pages)
    assert data["note"].startswith("a change is stamped (seen_at) by the first sync after it, not when it "
                                   "happened")


@pytest.mark.anyio
async def test_get_changes_filters_by_products_kinds_and_since(changed, env):
    _, acc, before, after, started, _ = changed
    expected = diff_states(before, after)
    second = acc.product_ids()[1]
    async with mcp_client(acc.handler) as client:
        mine = await all_pages(client, "get_changes", {"product_ids": [second]}, "changes")
        kinds = await all_pages(client, "get_changes", {"kinds": "bug_status,test_new"}, "changes")
        recent = await ok(client, "get_changes", {"since": started})
        db_rows_write(env, "UPDATE changes SET seen_at = '2026-01-01T10:00:00Z'")  # seen at one moment
        then = await ok(client, "get_changes", {"since": "2026-01-01T11:00:00+01:00"})
        later = await ok(client, "get_changes", {"since": "2026-01-01T10:00:01"})
    assert set(map(as_tuple, mine)) == {c for c in expected if c[1] == second} != set()
    assert set(map(as_tuple, kinds)) == {c for c in expected if c[0] in ("bug_status", "test_new")}
    assert recent["pagination"]["total"] == then["pagination"]["total"] == len(expected)
    assert (later["summary"], later["changes"], later["pagination"]["total"]) == ([], [], 0)
    assert (then["log"]["since"], later["log"]["since"]) == ("2026-01-01T10:00:00Z", "2026-01-01T10:00:01Z")


def test_a_first_sync_a_product_added_later_and_a_nuke_log_a_baseline_not_new_rows(env, capsys, monkeypatch):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    acc = make_account(products=3, tests_per_product=60, bugs_per_test=2)
    first, second, third = acc.product_ids()
    acc.add_tests(second, 45)  # two pages
    names = {p["id"]: p["name"] for p in acc.products_json()}
    started = tm.iso(datetime.now(timezone.utc))
    assert cli(capsys, "sync", "--product-ids", str(first), transport=mock(acc.handler))[0] == 0
    [cold] = answers(acc, ("get_changes", {"since": "2020-01-01"}))
    assert (cold["summary"], cold["changes"]) == ([], [])
    assert started <= cold["log"]["complete_from"] <= cold["log"]["to"]
    assert cold["note"] == (
        f"a change is stamped (seen_at) by the first sync after it, not when it happened; the log starts after "
        f"since for product {first} ({names[first]}) at {cold['log']['complete_from']} (a first sync, a --nuke "
        f"or the retention limit): changes before that are not in it")
    # the other products' first sync, the second one's cut short after a page: no log until a walk ends
    [new] = acc.add_tests(first, 1)
    faults = Faults(acc.handler).add(lambda r, n: httpx.Response(503) if f"/products/{second}/exploratory_tests"
                                     in r.url.path and r.url.params.get("page") == "2" else None)
    cli(capsys, "sync", transport=mock(faults))
    assert db_rows(env, "SELECT count(*) FROM tests WHERE product_id = ?", (second,)) == [(100,)]
    [added, answer] = answers(acc, ("get_changes", {}, "changes"), ("get_changes", {}))
    assert {(c["kind"], c["product_id"], c["test_id"]) for c in added} == {("test_new", first, new),
                                                                        ("bug_new", first, new)}
    assert len(added) == 1 + len(acc.bug_ids(new))
    assert answer["note"].endswith(f"; no change log yet for product {second} ({names[second]}): it starts when "
                                   f"a first sync ends")
    assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
    [resumed] = answers(acc, ("get_changes", {}, "changes"))
    assert resumed == added
    acc.add_tests(first, 1)
    nuked = tm.iso(datetime.now(timezone.utc))
    assert cli(capsys, "sync", "--nuke", "--yes", transport=mock(acc.handler))[0] == 0
    kept, restarted = answers(acc, ("get_changes", {}, "changes"), ("get_changes", {}))
    assert kept == added  # the old log stays history; what the nuke's sync stored is its baseline
    assert nuked <= restarted["log"]["complete_from"] <= restarted["log"]["to"]
    assert db_rows(env, "SELECT product_id, count(*) FROM changes WHERE kind = 'baseline' GROUP BY 1") == [
        (first, 2), (second, 2), (third, 2)]


def test_the_sync_prunes_changes_older_than_the_retention(changed, env, capsys, monkeypatch):
    _, acc, before, after, _, _ = changed
    expected = diff_states(before, after)
    old = db_rows(env, "SELECT id FROM changes WHERE kind != 'baseline' ORDER BY id")[::2]
    conn = sqlite3.connect(env)
    with conn:
        aged = tm.iso(datetime.now(timezone.utc) - timedelta(days=31))
        conn.executemany("UPDATE changes SET seen_at = ? WHERE id = ?", [(aged, i) for (i,) in old])
        conn.execute("UPDATE changes SET seen_at = ? WHERE kind = 'baseline'", (aged,))
    conn.close()
    monkeypatch.setenv("TESTIO_CHANGE_RETENTION_DAYS", "30")
    assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
    kept, answer = answers(acc, ("get_changes", {"since": "2000-01-01"}, "changes"),
                           ("get_changes", {"since": "2000-01-01"}))
    log = answer["log"]
    assert len(kept) == len(expected) - len(old) and set(map(as_tuple, kept)) < expected
    assert db_rows(env, "SELECT count(*) FROM changes WHERE seen_at <= ?", (aged,)) == [(0,)]
    thirty_days = tm.iso(datetime.now(timezone.utc) - timedelta(days=30))
    assert aged < log["complete_from"] <= thirty_days  # the retention limit, the baselines being gone


def test_the_change_log_outlives_a_damaged_cache_when_still_readable(changed, env, capsys):
    _, acc, _, _, _, _ = changed
    log = db_rows(env, "SELECT * FROM changes ORDER BY id")
    damage(env, "tests-and-bugs")
    code, _, err = cli(capsys, "sync", transport=mock(acc.handler))
    assert code == 0, err
    assert_told_once(err, env)
    assert_matches_truth(env, acc)
    assert db_rows(env, "SELECT * FROM changes WHERE id <= ? ORDER BY id", (log[-1][0],)) == log
    # the refill is the products' new baseline: it lists nothing as new
    assert db_rows(env, "SELECT kind, count(*) FROM changes WHERE id > ? GROUP BY 1", (log[-1][0],)) == [
        ("baseline", len(acc.product_ids()))]


@pytest.mark.parametrize("reached", [5, 9, 11, 13, 15])  # of 16 requests: pages, then bug batches
@pytest.mark.slow
def test_a_sync_killed_mid_way_never_leaves_a_change_without_its_data_or_the_reverse(
        env, capsys, loopback, tmp_path, reached):
    acc = lively_account(tests_per_product=150, bugs_per_test=2)
    assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
    change_account(acc)

    def stored():
        return ({r[0]: r[1:] for r in db_rows(env, "SELECT id, status, start_at, end_at FROM tests")},
                {r[0]: r[1:] for r in db_rows(env, "SELECT id, status, severity FROM bugs")})

    def logged(after_id):
        return sorted(db_rows(env, "SELECT kind, test_id, bug_id, old_value, new_value FROM changes "
                                   "WHERE id > ? AND kind != 'baseline'", (after_id,)), key=str)

    def diff(old, new):
        (ot, ob), (nt, nb) = old, new
        out = [("test_new", t, None, None, v[0]) for t, v in nt.items() if t not in ot]
        out += [("test_deleted", t, None, v[0], None) for t, v in ot.items() if t not in nt]
        out += [("test_status", t, None, ot[t][0], v[0]) for t, v in nt.items() if t in ot and ot[t][0] != v[0]]
        out += [("test_dates", t, None, f"{ot[t][1] or ''}/{ot[t][2] or ''}", f"{v[1] or ''}/{v[2] or ''}")
                for t, v in nt.items() if t in ot and ot[t][1:] != v[1:]]
        test_of = dict(db_rows(env, "SELECT id, test_id FROM bugs"))
        out += [("bug_new", test_of[b], b, None, v[0]) for b, v in nb.items() if b not in ob]
        out += [("bug_status", test_of[b], b, ob[b][0], v[0]) for b, v in nb.items() if b in ob and ob[b][0] != v[0]]
        out += [("bug_severity", test_of[b], b, ob[b][1], v[1]) for b, v in nb.items()
                if b in ob and ob[b][1] != v[1]]
        return sorted(out, key=str)

    first = stored()
    mark = db_rows(env, "SELECT max(id) FROM changes")[0][0]
    server = loopback(acc.handler)
    server.pause_after = reached
    proc = spawn_sync(tmp_path, server.base_url, "--refresh")
    if wait_for(server.reached, proc):
        proc.kill()
    code, _, err = finish(proc, tmp_path)
    server.release.set()
    assert code == -signal.SIGKILL, f"the sync ended before request {reached}: {err}"
    assert db_rows(env, "PRAGMA integrity_check") == [("ok",)]
    middle = stored()
    assert logged(mark) == diff(first, middle)
    assert cli(capsys, "sync", "--refresh", transport=mock(acc.handler))[0] == 0
    assert_matches_truth(env, acc)
    assert logged(mark) == diff(first, stored()) != []


###############################################################################
# The review queue: open bugs by their auto-accept deadline (test end + the review window)
###############################################################################

def review_queue_truth(acc: tm.SimulatedAccount, window_days: int, now: datetime,
                       product_ids=None) -> list[dict]:
    """The review queue from what the account serves: each test with forwarded bugs, its deadline (its
    end, at whatever offset, plus the window in days of 24 hours), days left and staleness; the
    soonest deadline first and the past ones last; bugs critical, high, then the rest, by report."""
    rank = {"critical": 0, "high": 1}
    groups = []
    for pid in product_ids or acc.product_ids():
        for test_id in acc.test_ids(pid):
            waiting = [b for b in acc.bugs_of(test_id) if b["status"] == "forwarded"]
            if not waiting:
                continue
            test = acc.test_json(test_id)
            deadline = datetime.fromisoformat(test["end_at"].replace("Z", "+00:00")) + timedelta(days=window_days)
            waiting.sort(key=lambda b: (rank.get(b["severity"], 2), utc(b["reported_at"]), b["id"]))
            groups.append({
                "test": {"id": test_id, "title": test["title"], "product_id": pid, "status": test["status"],
                         "end_at": utc(test["end_at"])},
                "auto_accept_at": deadline.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "days_left": round((deadline - now).total_seconds() / 86400, 1), "stale": deadline <= now,
                "open_bugs": len(waiting),
                "bugs": [{"id": b["id"], "title": b["title"], "severity": b["severity"],
                          "bug_type": shown_type(b["severity"]), "known": b["known"],
                          "reported_at": utc(b["reported_at"]), "tester": b["author"]["name"]} for b in waiting]})
    return sorted(groups, key=lambda g: (g["stale"], g["auto_accept_at"], g["test"]["id"]))


def review_summary(groups: list[dict], now: datetime) -> dict:
    live = [g for g in groups if not g["stale"]]
    soon = (now + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"open_bugs": sum(len(g["bugs"]) for g in groups), "tests": len(groups),
            "due_within_3_days": sum(len(g["bugs"]) for g in live if g["auto_accept_at"] <= soon),
            "next_auto_accept_at": min((g["auto_accept_at"] for g in live), default=None),
            "stale_bugs": sum(len(g["bugs"]) for g in groups if g["stale"]),
            "stale_tests": len(groups) - len(live)}


async def review_pages(client, args: dict, per_page: int) -> tuple[dict, list[dict]]:
    """Every page of get_review_queue: the first answer, and the tests with their bugs (a test cut
    between two pages joined again), checking each page's pagination."""
    answers, groups = await pages(client, "get_review_queue", args, per_page), []
    for page, data in enumerate(answers, 1):
        total = data["pagination"]["total"]
        assert sum(len(g["bugs"]) for g in data["tests"]) == min(per_page, total - (page - 1) * per_page)
        for group in data["tests"]:
            if groups and groups[-1]["test"]["id"] == group["test"]["id"]:
                groups[-1]["bugs"] += group["bugs"]
            else:
                groups.append(group)
    assert "notes" not in answers[-1]
    return answers[0], groups


def open_tests(acc: tm.SimulatedAccount, n: int) -> list[int]:
    """n tests with open bugs: archived tests with bugs put back to locked (triage), where the bugs
    nobody reviewed yet are forwarded again."""
    chosen = []
    for test_id in (t for pid in acc.product_ids() for t in acc.test_ids(pid)):
        if len(chosen) < n and acc.test_json(test_id)["status"] == "archived":
            acc.set_test_status(test_id, "locked")
            if any(b["status"] == "forwarded" for b in acc.bugs_of(test_id)):
                chosen.append(test_id)
            else:
                acc.set_test_status(test_id, "archived")
    assert len(chosen) == n
    return chosen


def answered_at(data: dict) -> datetime:
    return datetime.fromisoformat(data["now"].replace("Z", "+00:00"))


@pytest.mark.parametrize("window", [None, 3], ids=["default-10-days", "setting-3-days"])
@pytest.mark.anyio
async def test_review_queue_lists_open_bugs_by_test_soonest_deadline_first_and_flags_the_past_ones_stale(
        env, monkeypatch, window):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    if window:
        monkeypatch.setenv("TESTIO_REVIEW_WINDOW_DAYS", str(window))
    days = window or 10
    acc = make_account(products=2, tests_per_product=40)
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    for test_id, hours_left in zip(open_tests(acc, 4), (20, 50, 170, -30)):  # tomorrow, in 2 days, a week, past
        acc.move_test(test_id, now + timedelta(hours=hours_left) - timedelta(days=days))
    async with mcp_client(acc.handler) as client:
        await ok(client, "sync_data", {})
        asked = datetime.now(timezone.utc).replace(microsecond=0)
        first, groups = await review_pages(client, {}, per_page=7)
        one = acc.product_ids()[1]
        _, of_one = await review_pages(client, {"product_ids": str(one)}, per_page=200)
        answered = datetime.now(timezone.utc)
    assert asked <= answered_at(first) <= answered
    truth = review_queue_truth(acc, days, answered_at(first))
    assert groups == truth
    assert [g["test"]["id"] for g in of_one] == [g["test"]["id"] for g in truth if g["test"]["product_id"] == one]
    # the moved tests: two due within 3 days, one stale; the account's older locked tests are stale too
    summary = review_summary(truth, answered_at(first))
    assert summary["due_within_3_days"] >= 2 and summary["stale_tests"] >= 1 and summary["tests"] > summary["stale_tests"]
    per_product = [{"product_id": pid, "name": acc.products_json()[i]["name"],
                    **review_summary([g for g in truth if g["test"]["product_id"] == pid], answered_at(first))}
                   for i, pid in enumerate(acc.product_ids())]
    per_product.sort(key=lambda b: (b["next_auto_accept_at"] is None, b["next_auto_accept_at"] or "", b["name"]))
    assert first["summary"] == {**summary, "per_product": [b for b in per_product if b["tests"]]}
    assert first["review_window_days"] == days
    assert first["note"].startswith(f"auto_accept_at = test end + {days} days (TESTIO_REVIEW_WINDOW_DAYS); "
                                    f"{summary['stale_bugs']} open bugs of {summary['stale_tests']} tests are past "
                                    f"their deadline (stale): the local data is behind; sync_data(mode='refresh')")


@pytest.fixture
def new_york_time():
    """The process's local time zone is America/New_York, which has DST, as on a laptop there."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def with_end_at(handler, ends: dict[int, str]):
    """The account's answers, with the end_at of these tests written as given (any offset)."""
    def rewrite(request: httpx.Request) -> httpx.Response:
        response = handler(request)
        if "exploratory_tests" not in request.url.path or response.status_code != 200:
            return response
        body = json.loads(response.content)
        for test in body.get("exploratory_tests") or [body.get("exploratory_test")]:
            if test["id"] in ends:
                test["end_at"] = ends[test["id"]]
        return httpx.Response(200, json=body)
    return rewrite


DEADLINES = [  # (an end_at as the API may send it, its auto_accept_at: 10 days of 24 hours later, in UTC)
    ("2026-03-05T23:30:00-05:00", "2026-03-16T04:30:00Z"),  # New York's DST begins on 03-08 in between
    ("2026-10-22T23:45:00+02:00", "2026-11-01T21:45:00Z"),  # Europe's DST ends on 10-25, New York's on 11-01
    ("2026-12-31T22:00:00-05:00", "2027-01-11T03:00:00Z"),  # the UTC day and year are the next ones
    ("2027-03-26T05:30:00+05:30", "2027-04-05T00:00:00Z"),  # a half-hour offset, a deadline at UTC midnight
    ("2027-02-20T12:00:00Z", "2027-03-02T12:00:00Z"),       # no 29 February in 2027
]


@pytest.mark.anyio
async def test_review_deadlines_are_exact_utc_whatever_the_offset_and_across_dst_in_a_dst_time_zone(
        env, monkeypatch, new_york_time):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    acc = make_account(products=1, tests_per_product=40)
    waiting = open_tests(acc, len(DEADLINES))
    ends = dict(zip(waiting, (end for end, _ in DEADLINES)))
    async with mcp_client(with_end_at(acc.handler, ends)) as client:
        await ok(client, "sync_data", {})
        data = await ok(client, "get_review_queue", {"per_page": 200})
    now = answered_at(data)
    shown = {g["test"]["id"]: g for g in data["tests"]}
    for test_id, (end, deadline) in zip(waiting, DEADLINES):
        at = datetime.fromisoformat(deadline.replace("Z", "+00:00"))
        assert {k: shown[test_id][k] for k in ("auto_accept_at", "days_left", "stale")} == {
            "auto_accept_at": deadline, "days_left": round((at - now).total_seconds() / 86400, 1), "stale": at <= now}
        assert shown[test_id]["test"]["end_at"] == utc(end)
    live = [g["auto_accept_at"] for g in data["tests"] if not g["stale"]]
    assert live == sorted(live) and {"2027-03-02T12:00:00Z", "2027-04-05T00:00:00Z"} <= set(live)


@pytest.mark.anyio
async def test_a_stale_test_leaves_the_review_queue_once_a_refresh_sync_sees_its_bugs_decided(env, monkeypatch):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    acc = make_account(products=1, tests_per_product=40)
    open_tests(acc, 2)  # ended months ago: past their deadline
    async with mcp_client(acc.handler) as client:
        await ok(client, "sync_data", {})
        before, groups = await review_pages(client, {}, per_page=200)
        stale = next(g for g in groups if g["stale"])
        acc.set_test_status(stale["test"]["id"], "archived")  # TestIO auto-accepted what nobody reviewed
        await ok(client, "sync_data", {"mode": "refresh"})
        after, left = await review_pages(client, {}, per_page=200)
        bugs = await ok(client, "list_bugs", {"test_ids": [stale["test"]["id"]], "per_page": 200})
    assert "sync_data(mode='refresh') updates them" in before["note"]
    assert stale["test"]["id"] not in [g["test"]["id"] for g in left]
    assert after["summary"]["stale_bugs"] == before["summary"]["stale_bugs"] - stale["open_bugs"]
    decided = {b["id"]: b["status"] for b in bugs["bugs"]}
    assert {decided[b["id"]] for b in stale["bugs"]} - {"accepted", "rejected"} == {"auto_accepted"}


###############################################################################
# Period comparison: get_quality_report and query_metrics with compare
###############################################################################

def period_figures(pids, start: str, end: str) -> dict:
    """What get_quality_report says of the executed tests of `pids` ending within [start, end] (UTC
    days), from the pristine account: the report's tests and bugs, and each product's block."""
    lo, hi = f"{start}T00:00:00Z", f"{date.fromisoformat(end) + timedelta(days=1)}T00:00:00Z"
    figures = {"per_product": {}}
    everything = []
    for pid in pids:
        tests = [t for t in served_tests(pid) if t["status"] in EXECUTED and lo <= utc(t["end_at"]) < hi]
        bugs = [b for t in tests for b in served_bugs(t["id"])]
        everything += tests
        summary = bug_summary(bugs)
        figures["per_product"][pid] = {"tests": len(tests), "bugs": len(bugs), "by_status": summary["by_status"],
                                       "rates": summary["rates"], "health": summary["health"]}
    figures["tests"] = {"total": len(everything),
                        "by_status": dict(collections.Counter(t["status"] for t in everything)),
                        "by_testing_type": dict(collections.Counter(shown_testing_type(t["testing_type"])
                                                                    for t in everything))}
    figures["bugs"] = bug_summary([b for t in everything for b in served_bugs(t["id"])])
    return figures


def beside(now, before):
    """Each figure of `now` next to the same one of `before`: {value, previous, change} for a number
    (a count missing on one side is 0 there; change null when either is null), {value, previous}
    for a health grade."""
    if isinstance(now, dict):
        return {k: beside(now.get(k, 0), before.get(k, 0)) for k in [*now, *(k for k in before if k not in now)]}
    if isinstance(now, str):
        return {"value": now, "previous": before}
    if now is None or before is None:
        return {"value": now, "previous": before, "change": None}
    return {"value": now, "previous": before,
            "change": round(now - before, 4) if isinstance(now - before, float) else now - before}


CHANGE = ("value - previous: for a count the difference, for a rate the difference in rate units (0.05 = 5 "
          "percentage points); null when either is null")


@pytest.mark.parametrize("start, end, compare, previous, period", [
    ("2026-10-01", "2026-10-31", "previous", ("2026-09-01", "2026-09-30"), "the previous calendar month"),
    ("2026-07-01", "2026-09-30", "previous", ("2026-04-01", "2026-06-30"), "the previous 3 calendar months"),
    ("2026-10-05", "2026-10-18", "previous", ("2026-09-21", "2026-10-04"), "the previous 14 days"),
    ("2026-03-01", "2026-03-31", " previous ", ("2026-02-01", "2026-02-28"), "the previous calendar month"),
    ("2026-10-01", "2026-10-31", "2025-10-01..2025-10-31", ("2025-10-01", "2025-10-31"), "the period given"),
], ids=["month", "quarter", "two-weeks", "march-after-february", "explicit"])
@pytest.mark.anyio
async def test_quality_report_compare_sets_every_count_and_rate_beside_the_previous_periods(
        db, start, end, compare, previous, period):
    pids = PIDS[:2]
    async with mcp_client(make_account().handler) as client:
        data = await ok(client, "get_quality_report", {"product_ids": pids, "start_date": start, "end_date": end,
                                                       "compare": compare})
    now, before = period_figures(pids, start, end), period_figures(pids, *previous)
    assert now["bugs"]["total"] and before["bugs"]["total"], "both periods must have bugs to mean anything"
    assert data["tests"] == beside(now["tests"], before["tests"])
    assert data["bugs"] == beside(now["bugs"], before["bugs"])
    assert data["per_product"] == [{"product_id": pid, "name": NAMES[pid],
                                    **beside(now["per_product"][pid], before["per_product"][pid])} for pid in pids]
    assert data["compared_with"] == {"start_date": previous[0], "end_date": previous[1], "period": period,
                                     "change": CHANGE}
    assert (data["scope"]["start_date"], data["scope"]["end_date"]) == (start, end)
    lo, hi = f"{start}T00:00:00Z", f"{date.fromisoformat(end) + timedelta(days=1)}T00:00:00Z"
    assert {t["id"] for t in data["top_tests"]} <= {t["id"] for pid in pids for t in served_tests(pid)
                                                   if lo <= utc(t["end_at"]) < hi}


@pytest.mark.anyio
async def test_quality_report_compare_with_an_empty_period_keeps_rates_null_and_changes_null_not_zero(db):
    async with mcp_client(make_account().handler) as client:
        against_nothing = await ok(client, "get_quality_report", {
            "product_ids": [P], "start_date": "2026-10-01", "end_date": "2026-10-31",
            "compare": "2019-01-01..2019-01-31"})
        nothing = await ok(client, "get_quality_report", {"product_ids": [P], "start_date": "2019-02-01",
                                                          "end_date": "2019-02-28", "compare": "previous"})
    now = period_figures([P], "2026-10-01", "2026-10-31")
    rates = against_nothing["bugs"]["rates"]
    assert rates == {name: {"value": value, "previous": None, "change": None} for name, value in now["bugs"]["rates"].items()}
    assert against_nothing["bugs"]["total"] == {"value": now["bugs"]["total"], "previous": 0,
                                                "change": now["bugs"]["total"]}
    assert {k: v["previous"] for k, v in against_nothing["bugs"]["health"].items()} == dict.fromkeys(
        now["bugs"]["health"], "unknown")
    assert nothing["bugs"]["rates"] == dict.fromkeys(rates, {"value": None, "previous": None, "change": None})
    assert nothing["tests"]["total"] == {"value": 0, "previous": 0, "change": 0}
    assert nothing["compared_with"]["start_date"] == "2019-01-01"


def pivot_cells(start: str, end: str) -> dict:
    """query_metrics by product and severity over the tests ending within [start, end], from the
    pristine account: (product, severity) -> bug_count, test_count, rejection_rate, bugs_per_test."""
    lo, hi = f"{start}T00:00:00Z", f"{date.fromisoformat(end) + timedelta(days=1)}T00:00:00Z"
    groups = collections.defaultdict(list)
    for pid in PIDS:
        for t in served_tests(pid):
            if lo <= utc(t["end_at"]) < hi:
                for b in served_bugs(t["id"]):
                    groups[(pid, b["severity"])].append(b)
    return {cell: {"bug_count": len(bugs), "test_count": len({b["test"]["id"] for b in bugs}),
                   "rejection_rate": bug_rates(bugs)["rejection_rate"],
                   "bugs_per_test": round(len(bugs) / len({b["test"]["id"] for b in bugs}), 3)}
            for cell, bugs in groups.items()}


@pytest.mark.anyio
async def test_query_metrics_compare_sets_each_metric_beside_the_previous_period_row_by_row(db):
    metrics = ["bug_count", "test_count", "rejection_rate", "bugs_per_test"]
    async with mcp_client(make_account().handler) as client:
        data = await ok(client, "query_metrics", {"metrics": metrics, "dimensions": ["product", "severity"],
                                                  "start_date": "2026-10-01", "end_date": "2026-10-31",
                                                  "compare": "previous", "limit": 1000})
    now, before = pivot_cells("2026-10-01", "2026-10-31"), pivot_cells("2026-09-01", "2026-09-30")
    assert set(now) != set(before), "a row of one period only must be in the answer too"
    counts = {"bug_count": 0, "test_count": 0, "rejection_rate": None, "bugs_per_test": None}
    expected = {cell: {"product": cell[0], "severity": cell[1], "product_name": NAMES[cell[0]],
                       **{m: beside(now.get(cell, counts)[m], before.get(cell, counts)[m]) for m in metrics}}
                for cell in {*now, *before}}
    assert {(r["product"], r["severity"]): r for r in data["rows"]} == expected
    assert data["total_rows"] == len(expected) == len(data["rows"])
    order = [r["bug_count"]["value"] for r in data["rows"]]
    assert order == sorted(order, reverse=True)
    assert data["compared_with"] == {"start_date": "2026-09-01", "end_date": "2026-09-30",
                                     "period": "the previous calendar month", "change": CHANGE}


###############################################################################
# Prompts and resources: listed, rendered and completed through the SDK's client
###############################################################################

PROMPTS = ("weekly_review", "customer_meeting", "test_deep_dive")
RESOURCES = ("testio://products", "testio://playbook")


def tools_named(text: str) -> set[str]:
    """The tool calls a prompt asks for: name(...)."""
    return set(re.findall(r"\b([a-z]+(?:_[a-z]+)+)\(", text))


@pytest.mark.anyio
async def test_the_server_advertises_exactly_tools_prompts_resources_and_completions(db):
    for mode in ("legacy", "auto"):  # the handshake era (Claude clients) and 2026-07-28
        runtime = tm.Runtime(tm.Settings.from_env(), transport_for(make_account().handler))
        async with Client(tm.build_server(runtime), mode=mode) as client:
            capabilities = client.server_capabilities.model_dump(by_alias=True, exclude_none=True)
            templates = (await client.list_resource_templates()).resource_templates
        # no change notifications (nothing here changes the lists) and no resource subscriptions
        assert capabilities == {"tools": {"listChanged": False}, "prompts": {"listChanged": False},
                                "resources": {"subscribe": False, "listChanged": False}, "completions": {}}, mode
        assert templates == [], mode


@pytest.mark.anyio
async def test_prompts_are_listed_with_described_arguments_and_render_chains_of_existing_tools(db):
    today = datetime.now(timezone.utc).date()
    test_id = served_tests(P)[3]["id"]
    async with mcp_client(make_account().handler) as client:
        listed = {p.name: p for p in (await client.list_prompts()).prompts}
        weekly = await client.get_prompt("weekly_review", {})
        weekly_one = await client.get_prompt("weekly_review", {"product_ids": f"{PIDS[1]}", "since": "2026-11-02"})
        meeting = await client.get_prompt("customer_meeting", {"product_ids": f"{P},{PIDS[2]}"})
        meeting_from = await client.get_prompt("customer_meeting", {"start_date": "2026-10-01",
                                                                    "end_date": "2026-10-31"})
        dive = await client.get_prompt("test_deep_dive", {"test_id": str(test_id)})
        dive_unknown = await client.get_prompt("test_deep_dive", {"test_id": "777"})
    assert list(listed) == list(tm.PROMPTS) == list(PROMPTS)
    for name, p in listed.items():
        assert p.title and p.description and len(p.description) > 40, name
        assert p.arguments and all(a.description for a in p.arguments), name
    assert [(a.name, a.required) for a in listed["test_deep_dive"].arguments] == [("test_id", True)]
    texts = {}
    for key, rendered in (("weekly", weekly), ("weekly_one", weekly_one), ("meeting", meeting),
                          ("meeting_from", meeting_from), ("dive", dive), ("dive_unknown", dive_unknown)):
        assert [m.role for m in rendered.messages] == ["user"], key
        texts[key] = rendered.messages[0].content.text
        assert tools_named(texts[key]) and tools_named(texts[key]) <= set(TOOLS), key
    # weekly: every product by default, the last 7 days (today included), changes + queue + report vs before
    week = (today - timedelta(days=6)).isoformat()
    every = json.dumps(sorted(PIDS, key=lambda pid: NAMES[pid]))
    assert f'get_changes(since="{week}", product_ids={every})' in texts["weekly"]
    assert f"get_review_queue(product_ids={every})" in texts["weekly"]
    assert (f'get_quality_report(product_ids={every}, start_date="{week}", end_date="{today}", '
            f'compare="previous")') in texts["weekly"]
    assert all(f"{NAMES[pid]} ({pid})" in texts["weekly"] for pid in PIDS) and "testio://playbook" in texts["weekly"]
    assert f'get_changes(since="2026-11-02", product_ids=[{PIDS[1]}])' in texts["weekly_one"]
    # meeting: the last full quarter by default, against the one before; or the period given
    quarter_end = date(today.year, (today.month - 1) // 3 * 3 + 1, 1) - timedelta(days=1)
    quarter = date(quarter_end.year, quarter_end.month - 2, 1)
    assert (f'get_quality_report(product_ids=[{P}, {PIDS[2]}], start_date="{quarter}", end_date="{quarter_end}", '
            f'compare="previous")') in texts["meeting"]
    assert 'start_date="2026-10-01", end_date="2026-10-31"' in texts["meeting_from"]
    assert "against 2026-09-01 to 2026-09-30" in texts["meeting_from"]
    assert 'dimensions=["month"]' in texts["meeting"] and 'dimensions=["feature"]' in texts["meeting"]
    # deep dive: the test named with its title and product when known, fetched by get_test_status when not
    test = next(t for t in served_tests(P) if t["id"] == test_id)
    assert f'test {test_id}, "{test["title"]}" ({test["status"]}, ends {utc(test["end_at"])}) of {NAMES[P]} ({P})' \
        in texts["dive"]
    assert f"get_test_status(test_id={test_id})" in texts["dive"] and f"product_ids=[{P}]" in texts["dive"]
    assert "not in the local data yet: get_test_status fetches it" in texts["dive_unknown"]


@pytest.mark.parametrize("name, args, fragments", [
    ("weekly_review", {"product_ids": "99"}, ["product 99 is not in the local data", "list_products"]),
    ("weekly_review", {"product_ids": "1;2"}, ["product_ids='1;2'", "positive whole number"]),
    ("weekly_review", {"since": "last monday"}, ["since='last monday' is not a date", "YYYY-MM-DD"]),
    ("weekly_review", {"since": "2999-01-01"}, ["since='2999-01-01' is in the future"]),
    ("weekly_review", {"week": "1"}, ["weekly_review has no argument 'week'", "product_ids, since"]),
    ("customer_meeting", {"end_date": "2026-10-31"}, ["end_date='2026-10-31' needs a start_date"]),
    ("customer_meeting", {"start_date": "2026-11-01", "end_date": "2026-10-01"}, ["start_date='2026-11-01'", "after"]),
    ("customer_meeting", {"start_date": "0001-01-01"}, ["no period before 0001-01-01"]),
    ("test_deep_dive", {"test_id": "abc"}, ["test_id='abc'", "positive whole number"]),
    ("test_deep_dive", {"test_id": "1,2"}, ["test_id='1,2' is not one test id"]),
    ("test_deep_dive", {}, ["test_deep_dive needs test_id: the test (cycle) id"]),
    ("weekly", {}, ["there is no prompt 'weekly'", "weekly_review, customer_meeting, test_deep_dive"]),
], ids=["unknown-product", "bad-ids", "bad-since", "future-since", "unknown-argument", "end-without-start",
        "swapped-dates", "nothing-before", "bad-test-id", "two-test-ids", "missing-test-id", "unknown-prompt"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.anyio
async def test_a_prompt_with_a_bad_argument_answers_an_error_naming_it_and_the_fix(db, caplog, mode, name, args,
                                                                                  fragments):
    runtime = tm.Runtime(tm.Settings.from_env(), transport_for(make_account().handler))
    async with Client(tm.build_server(runtime), mode=mode) as client:
        with pytest.raises(Exception) as raised:
            await client.get_prompt(name, args)
    text = str(getattr(raised.value, "message", raised.value))
    assert [f for f in fragments if f not in text] == [], text
    assert "Traceback" not in text and "Error rendering prompt" not in text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


@pytest.mark.anyio
async def test_resources_list_the_products_and_the_playbook_with_thresholds_and_the_review_window(db, monkeypatch):
    monkeypatch.setenv("TESTIO_REVIEW_WINDOW_DAYS", "7")
    async with mcp_client(make_account().handler) as client:
        listed = (await client.list_resources()).resources
        products = (await client.read_resource("testio://products")).contents
        playbook = (await client.read_resource("testio://playbook")).contents
        with pytest.raises(Exception) as unknown:
            await client.read_resource("testio://nothing")
    assert [(r.uri, r.mime_type) for r in listed] == [("testio://products", "application/json"),
                                                      ("testio://playbook", "text/markdown")]
    assert list(tm.RESOURCES) == list(RESOURCES) and all(r.title and r.description for r in listed)
    served = json.loads(products[0].text)
    assert served["data_as_of"] and products[0].mime_type == "application/json"
    assert sorted((p["id"], p["name"], p["test_count"]) for p in served["products"]) == sorted(
        (p["id"], p["name"], len(served_tests(p["id"]))) for p in PRISTINE.products_json())
    text = playbook[0].text
    for rate, warning, critical, sign in (("rejection_rate", "0.20", "0.35", ">="),
                                          ("auto_acceptance_rate", "0.20", "0.40", ">="),
                                          ("active_acceptance_rate", "0.35", "0.20", "<="),
                                          ("review_rate", "0.80", "0.60", "<=")):
        assert f"| {rate} |" in text and f"| {sign} {warning} | {sign} {critical} |" in text, rate
        assert f"## {rate}" in text
    assert "7 days after its test ends (TESTIO_REVIEW_WINDOW_DAYS)" in text and "get_review_queue" in text
    assert "testio://nothing" in str(getattr(unknown.value, "message", unknown.value))


@pytest.mark.anyio
async def test_prompt_arguments_complete_to_product_and_test_ids_of_the_local_data(db):
    from mcp.types import PromptReference
    weekly, dive = PromptReference(type="ref/prompt", name="weekly_review"), \
        PromptReference(type="ref/prompt", name="test_deep_dive")
    by_name = sorted(PIDS, key=lambda pid: NAMES[pid])
    newest = sorted((t for pid in PIDS for t in served_tests(pid)), key=lambda t: (utc(t["end_at"]), t["id"]),
                    reverse=True)
    word = NAMES[PIDS[1]].split()[-2]  # a word of one product's name
    async with mcp_client(make_account().handler) as client:
        async def complete(ref, name, value):
            return (await client.complete(ref, {"name": name, "value": value})).completion
        every = await complete(weekly, "product_ids", "")
        by_word = await complete(weekly, "product_ids", word.lower())
        second = await complete(weekly, "product_ids", f"{P},")
        tests = await complete(dive, "test_id", "")
        prefixed = await complete(dive, "test_id", str(newest[0]["id"])[:4])
        nothing = await complete(dive, "test_id", "x")
        other = await complete(weekly, "since", "2026")
    assert (every.values, every.total, every.has_more) == ([str(p) for p in by_name], 3, False)
    assert by_word.values == [str(PIDS[1])]
    assert second.values == [f"{P},{p}" for p in by_name if p != P]
    assert (tests.values, tests.has_more) == ([str(t["id"]) for t in newest[:100]], True)
    assert prefixed.values == [str(t["id"]) for t in newest if str(t["id"]).startswith(str(newest[0]["id"])[:4])][:100]
    assert nothing.values == [] and other.values == []


###############################################################################
# Answer sizes: what a chat model must read whole stays small by default
###############################################################################

DEFAULT_ANSWER_MAX = 20_000  # bytes of one answer's text with default arguments


@pytest.mark.slow
@pytest.mark.anyio
async def test_every_tool_answers_the_demo_account_in_at_most_20_kb_with_default_arguments(
        env, monkeypatch, demo_template):
    env.parent.mkdir(parents=True)
    shutil.copyfile(demo_template[0], env.with_name("demo.db"))
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    demo = demo_truth()
    pids = demo.product_ids()
    busiest = max(demo.test_ids(pids[0]), key=lambda t: len(demo.bug_ids(t)))
    every_metric = list(tm.METRICS)
    calls = [("health_check", {}), ("list_products", {}), ("list_tests", {"product_id": pids[0]}),
             ("get_test_status", {"test_id": busiest}), ("list_bugs", {"product_ids": pids}),
             ("list_bugs", {"test_ids": [busiest]}), ("get_bug", {"bug_id": demo.bug_ids(busiest)[0]}),
             ("list_features", {"product_id": pids[1]}), ("get_quality_report", {"product_ids": pids}),
             ("query_metrics", {"metrics": every_metric, "dimensions": ["tester", "feature"]}),
             ("search", {"query": "login"}), ("sync_data", {}), ("get_database_stats", {}),
             ("get_review_queue", {}),
             ("get_sync_history", {}), ("get_problematic_tests", {}), ("get_changes", {})]
    sizes = {}
    runtime = tm.Runtime(tm.Settings.from_env(demo=True), transport_for(demo.handler))
    async with Client(tm.build_server(runtime), mode="legacy") as client:
        for tool, args in calls:
            result = await client.call_tool(tool, args)
            assert result.is_error is False, result.content[0].text
            assert json.loads(result.content[0].text) == result.structured_content
            sizes[f"{tool} {json.dumps(args)[:40]}"] = len(result.content[0].text.encode())
    assert {tool for tool, _ in calls} == set(TOOLS)
    assert {call: size for call, size in sizes.items() if size > DEFAULT_ANSWER_MAX} == {}, sizes


@pytest.mark.anyio
async def test_a_cut_list_names_the_call_for_the_rest(db):
    async with mcp_client(make_account().handler) as client:
        tests = await ok(client, "list_tests", {"product_id": P, "per_page": 50, "page": 2})
        last = await ok(client, "list_tests", {"product_id": P, "per_page": 50, "page": 3})
        bugs = await ok(client, "list_bugs", {"product_ids": [P]})
        pivot = await ok(client, "query_metrics", {"metrics": "bug_count", "dimensions": "tester", "limit": 2})
    assert tests["notes"] == ["51-100 of 120 shown; call list_tests again with page=3 and the same other "
                              "arguments for more"]
    assert "notes" not in last
    assert bugs["pagination"]["per_page"] == 50 and bugs["notes"][0].startswith("1-50 of ")
    assert pivot["notes"] == [f"2 of {pivot['total_rows']} rows; raise limit (at most 1000), add filters or "
                              f"sort_by to see others"]


###############################################################################
# Bad input: an error result naming the argument, the bad value and what is accepted
###############################################################################

T = next(t["id"] for t in served_tests(P) if t["status"] == "archived" and served_bugs(t["id"]))
METRIC = {"metrics": ["bug_count"], "dimensions": ["severity"]}


BAD_INPUT = [  # (tool, arguments, every fragment the error text must hold)
    ("list_tests", {"product_id": "abc"}, ["product_id: 'abc' is not accepted; use a whole number from 1 to 9223372036854775807"]),
    ("list_tests", {"product_id": 0}, ["product_id: 0 is not accepted", "whole number from 1"]),
    ("list_tests", {"product_id": P, "per_page": 201}, ["per_page: 201 is not accepted", "from 1 to 200"]),
    ("list_tests", {"product_id": P, "page": 0}, ["page: 0 is not accepted", "from 1 to 1000000"]),
    ("list_tests", {"product_id": P, "statuses": "locked,done"}, ["statuses", "'done'", "initialized", "cancelled"]),
    ("list_tests", {"product_id": P, "testing_type": "external"}, ["testing_type: 'external'", "one of coverage, focused", "custom"]),
    ("list_tests", {"product_id": P, "sort_by": "name"}, ["sort_by: 'name'", "one of end_at, start_at, id, title, status"]),
    ("list_tests", {"product_id": P, "start_date": "2026-02-01", "end_date": "2026-01-01"},
     ["start_date='2026-02-01'", "end_date='2026-01-01'", "after"]),
    ("list_tests", {"product_id": P, "start_date": "31.01.2026"}, ["start_date='31.01.2026'", "YYYY-MM-DD"]),
    ("list_tests", {"product_id": P, "end_date": "2026-02-30"}, ["end_date='2026-02-30'", "YYYY-MM-DD"]),
    ("list_tests", {"product_id": 99}, ["product 99 is not in the local data", "list_products"]),
    ("list_products", {"product_type": "car"}, ["product_type: 'car'", "one of website"]),
    ("get_test_status", {"test_id": -3}, ["test_id: -3 is not accepted", "from 1 to"]),
    ("get_test_status", {"test_id": 2**64}, [f"test_id: {2**64}", "to 9223372036854775807"]),
    ("list_bugs", {}, ["exactly one of test_ids or product_ids", "test_ids=None", "product_ids=None"]),
    ("list_bugs", {"test_ids": [T], "product_ids": [P]}, ["exactly one of test_ids or product_ids",
                                                          f"test_ids=[{T}]", f"product_ids=[{P}]"]),
    ("list_bugs", {"test_ids": "1,x"}, ["test_ids: 'x' is not accepted", "whole number from 1", '"1,2"']),
    ("list_bugs", {"test_ids": "99999999999999999999"}, ["test_ids: '99999999999999999999'",
                                                         "to 9223372036854775807"]),
    ("list_bugs", {"test_ids": [0]}, ["test_ids: 0", "a JSON list (each a whole number from 1", '"1,2"']),
    ("list_bugs", {"test_ids": [99]}, ["test 99 is not in the local data", "get_test_status"]),
    ("list_bugs", {"product_ids": "99"}, ["product 99 is not in the local data", "list_products"]),
    ("list_bugs", {"product_ids": [P], "severity": "blocker"}, ["severity", "'blocker'", "critical"]),
    ("list_bugs", {"product_ids": [P], "status": "open,closed"}, ["status", "'closed'", "auto_accepted"]),
    ("list_bugs", {"product_ids": [P], "rejection_reason": "rude"}, ["rejection_reason", "'rude'", "known_bug"]),
    ("list_bugs", {"product_ids": [P], "known": "perhaps"}, ["known: 'perhaps'", "true or false"]),
    ("get_bug", {"bug_id": 5}, ["bug 5 is not in the local data", "list_bugs"]),
    ("get_bug", {"bug_id": "five"}, ["bug_id: 'five'", "whole number"]),
    ("list_features", {"product_id": 99}, ["product 99 is not in the local data", "list_products"]),
    ("get_quality_report", {}, ["product_ids is required: give a JSON list"]),
    ("get_quality_report", {"product_ids": []}, ["product_ids is empty", "at least one product id"]),
    ("get_quality_report", {"product_ids": f"{P},99"}, ["product 99 is not in the local data", "list_products"]),
    ("get_quality_report", {"product_ids": [P], "statuses": ["done"]}, ["statuses", "'done'", "archived"]),
    ("query_metrics", {"metrics": ["bug_count"], "dimensions": ["colour"]}, ["dimensions: 'colour'", "severity"]),
    ("query_metrics", {"metrics": "bugs", "dimensions": "month"}, ["metrics", "'bugs'", "bug_count"]),
    ("query_metrics", {"metrics": "bug_count", "dimensions": "month,week,product"},
     ["one or two dimensions", "dimensions=['month', 'week', 'product']"]),
    ("query_metrics", {**METRIC, "limit": 1001}, ["limit: 1001", "from 1 to 1000"]),
    ("query_metrics", {**METRIC, "filters": {"colour": ["red"]}}, ["filters", "'colour'", "product_ids"]),
    ("query_metrics", {**METRIC, "filters": {"severities": ["huge"]}}, ["filters.severities", "'huge'", "critical"]),
    ("query_metrics", {**METRIC, "filters": {"product_ids": [99]}}, ["product 99 is not in the local data"]),
    ("query_metrics", {**METRIC, "sort_by": "tester"}, ["sort_by='tester'", "bug_count, severity"]),
    ("query_metrics", {**METRIC, "start_date": "2026-05-01", "end_date": "2026-04-01"}, ["start_date", "after"]),
    ("search", {}, ["query is required: give text of at most 500 characters"]),
    ("search", {"query": "x", "entities": "bug,issue"}, ["entities", "'issue'", "product, feature, test, bug"]),
    ("search", {"query": "x", "limit": 201}, ["limit: 201", "from 1 to 200"]),
    ("search", {"query": "x", "product_ids": [99]}, ["product 99 is not in the local data", "list_products"]),
    ("search", {"query": 42}, ["query: 42 is not accepted; use text"]),
    ("sync_data", {"mode": "nuke"}, ["mode: 'nuke'", "one of incremental, refresh, force"]),
    ("sync_data", {"product_ids": "1;2"}, ["product_ids: '1;2' is not accepted", "whole number from 1"]),
    ("get_sync_history", {"limit": 51}, ["limit: 51", "from 1 to 50"]),
    ("get_sync_history", {"limit": "ten"}, ["limit: 'ten'", "whole number from 1 to 50"]),
    ("get_problematic_tests", {"product_id": 0}, ["product_id: 0", "from 1 to"]),
    ("get_review_queue", {"product_ids": [99]}, ["product 99 is not in the local data", "list_products"]),
    ("get_review_queue", {"per_page": 0}, ["per_page: 0 is not accepted", "from 1 to 200"]),
    ("get_quality_report", {"product_ids": [P], "compare": "previous"},
     ["compare='previous' needs start_date", "end_date defaults to today"]),
    ("get_quality_report", {"product_ids": [P], "start_date": "2026-01-01", "compare": "last month"},
     ["compare='last month' is not accepted; use previous, or a period", "2026-01-01..2026-01-31"]),
    ("get_quality_report", {"product_ids": [P], "start_date": "2026-01-01", "compare": "2026-02-01..2026-01-01"},
     ["compare='2026-02-01..2026-01-01' starts after it ends"]),
    ("get_quality_report", {"product_ids": [P], "start_date": "2026-01-01", "compare": "2026-02-01..2026-02-30"},
     ["compare='2026-02-01..2026-02-30' is not a period", "YYYY-MM-DD..YYYY-MM-DD"]),
    ("get_quality_report", {"product_ids": [P], "start_date": "0001-01-01", "end_date": "0001-12-31",
                            "compare": "previous"}, ["no period before 0001-01-01"]),
    ("get_quality_report", {"product_ids": [P], "start_date": "2999-01-01", "compare": "previous"},
     ["start_date='2999-01-01' is after today", "end_date"]),
    ("query_metrics", {**METRIC, "dimensions": ["month"], "start_date": "2026-01-01", "compare": "previous"},
     ["compare does not fit dimensions='month'", "over both periods"]),
    ("query_metrics", {**METRIC, "compare": "previous"}, ["compare='previous' needs start_date"]),
    # a bare value where a list belongs, an unknown name inside a list, a wrong type inside an object
    ("list_bugs", {"test_ids": 5}, ["test_ids: 5 is not accepted", "a JSON list", 'a comma string like "1,2"']),
    ("get_quality_report", {"product_ids": 5}, ["product_ids: 5 is not accepted", "a JSON list"]),
    ("query_metrics", {"metrics": ["bugs"], "dimensions": ["month"]}, ["metrics: 'bugs'", "rejection_rate"]),
    ("query_metrics", {"metrics": ["bug_count"]}, ["dimensions is required", "quarter"]),
    ("query_metrics", {**METRIC, "filters": {"severities": 5}}, ["filters.severities: 5 is not accepted"]),
    ("list_tests", {"product_id": "x", "per_page": 0}, ["product_id: 'x'", "(also check per_page)"]),
    ("get_changes", {"since": "last monday"}, ["since='last monday' is not a date or time", "YYYY-MM-DD"]),
    ("get_changes", {"since": "2026-11-31"}, ["since='2026-11-31' is not a date or time", "ISO time"]),
    ("get_changes", {"since": "2999-01-01"}, ["since='2999-01-01' is in the future", "give a past date"]),
    ("get_changes", {"kinds": "bug_new,bug_closed"}, ["kinds", "'bug_closed'", "test_new", "bug_severity"]),
    ("get_changes", {"product_ids": [99]}, ["product 99 is not in the local data", "list_products"]),
    ("get_changes", {"per_page": 201}, ["per_page: 201 is not accepted", "from 1 to 200"]),
]


@pytest.mark.parametrize("tool, args, fragments", BAD_INPUT,
                         ids=[f"{i:02}-{tool}-{'-'.join(args) or 'no-arguments'}" for i, (tool, args, _) in
                              enumerate(BAD_INPUT)])
@pytest.mark.anyio
async def test_bad_input_gets_an_error_naming_the_argument_the_value_and_what_is_accepted(db, tool, args, fragments):
    async with mcp_client(make_account().handler) as client:
        text = await err(client, tool, args)
    missing = [f for f in fragments if f not in text]
    assert missing == [], text
    dump = ("validation error", "Arguments", "input_value", "type=", "pydantic", "\n")  # pydantic's wording
    assert [word for word in dump if word in text] == [], text


###############################################################################
# Read-through: get_test_status asks the API for what the cache lacks or holds stale
###############################################################################

RUNNING = next(t["id"] for t in served_tests(P) if t["status"] == "running")


@pytest.mark.anyio
async def test_get_test_status_fetches_a_test_missing_locally_and_stores_it_with_its_bugs(db):
    acc = make_account()
    [new] = acc.add_tests(P, 1)
    faults = Faults(acc.handler)
    async with mcp_client(faults) as client:
        data = await ok(client, "get_test_status", {"test_id": new})
    assert faults.log == [f"/customer/v2/exploratory_tests/{new}?", f"/customer/v2/bugs?filter_test_cycle_ids={new}"]
    assert (data["test"]["id"], data["test"]["status"], data["warning"]) == (new, "locked", None)
    assert data["bug_summary"] == bug_summary(acc.bugs_of(new))
    assert db_rows(db, "SELECT product_id, status FROM tests WHERE id = ?", (new,)) == [(P, "locked")]
    assert sorted(r[0] for r in db_rows(db, "SELECT id FROM bugs WHERE test_id = ?", (new,))) == acc.bug_ids(new)


@pytest.mark.anyio
async def test_a_read_through_keeps_the_stored_product_when_the_test_embeds_a_slimmer_copy(db):
    acc = make_account()
    [new] = acc.add_tests(P, 1)
    before = db_rows(db, "SELECT * FROM products WHERE id = ?", (P,))

    def slim(request, n):  # the API document promises only the product's id, name and type
        if request.url.path.endswith(f"/exploratory_tests/{new}"):
            test = json.loads(acc.handler(request).content)
            test["exploratory_test"]["product"] = {"id": P, "name": "Slim", "type": "website"}
            return httpx.Response(200, json=test)
    async with mcp_client(Faults(acc.handler).add(slim)) as client:
        data = await ok(client, "get_test_status", {"test_id": new})
    assert data["test"]["id"] == new
    assert db_rows(db, "SELECT * FROM products WHERE id = ?", (P,)) == before


def age_test(db_path: Path, test_id: int, synced_at: str = "2026-01-01T00:00:00Z") -> None:
    """Arrange a test synced long ago (the database file is a boundary; no clock is faked)."""
    conn = sqlite3.connect(str(db_path))
    with conn:
        conn.execute("UPDATE tests SET changed_at = ?, bugs_synced_at = ? WHERE id = ?", (synced_at, synced_at, test_id))
    conn.close()


@pytest.mark.parametrize("aged, refreshed", [(True, True), (False, False)],
                         ids=["older-than-interval-is-refreshed", "fresh-is-answered-from-cache"])
@pytest.mark.anyio
async def test_get_test_status_refreshes_a_running_test_older_than_the_refresh_interval(db, monkeypatch, aged,
                                                                                        refreshed):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "3600")
    if aged:
        age_test(db, RUNNING)
    acc = make_account()
    before = acc.bugs_of(RUNNING)
    acc.set_test_status(RUNNING, "locked")  # the test ended: every bug of it is visible now
    after = acc.bugs_of(RUNNING)
    assert len(after) > len(before)
    faults = Faults(acc.handler)
    async with mcp_client(faults) as client:
        data = await ok(client, "get_test_status", {"test_id": RUNNING})
    status, bugs = ("locked", after) if refreshed else ("running", before)
    assert (data["test"]["status"], data["warning"]) == (status, None)
    assert data["bug_summary"] == bug_summary(bugs)
    assert faults.calls == (2 if refreshed else 0)
    assert db_rows(db, "SELECT status FROM tests WHERE id = ?", (RUNNING,)) == [(status,)]


@pytest.mark.anyio
async def test_a_change_a_read_through_stores_is_in_the_change_log(db, monkeypatch):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "3600")
    age_test(db, RUNNING)
    acc = make_account()
    before = served_state(acc)
    acc.set_test_status(RUNNING, "locked")  # no sync will see this change: the read-through stores it
    async with mcp_client(acc.handler) as client:
        await ok(client, "get_test_status", {"test_id": RUNNING})
        feed = await all_pages(client, "get_changes", {}, "changes")
    assert {"test_status", "bug_new"} < {c["kind"] for c in feed}
    assert set(map(as_tuple, feed)) == diff_states(before, served_state(acc))
    assert db_rows(db, "SELECT DISTINCT run_id FROM changes WHERE kind != 'baseline'") == [(None,)]


@pytest.mark.anyio
async def test_get_test_status_answers_from_the_cache_with_a_warning_when_the_api_fails(db):
    age_test(db, RUNNING)
    acc = make_account()
    before = acc.bugs_of(RUNNING)
    acc.set_test_status(RUNNING, "locked")
    path = f"/customer/v2/exploratory_tests/{RUNNING}"
    faults = Faults(acc.handler).add(lambda request, n: httpx.Response(503) if request.url.path == path else None)
    async with mcp_client(faults) as client:
        data = await ok(client, "get_test_status", {"test_id": RUNNING})
    assert (data["test"]["status"], data["bug_summary"]) == ("running", bug_summary(before))
    assert data["warning"] == (f"could not refresh this running test from the API (GET exploratory_tests/{RUNNING}: "
                               f"HTTP 503 after 5 attempts); answering from the local copy (last changed "
                               f"2026-01-01T00:00:00Z)")
    assert faults.log == [f"{path}?"] * 5


@pytest.mark.parametrize("fault, fragments", [
    (None, ["test 5 does not exist or is not visible to this token", "check the id with list_tests"]),
    (503, ["test 5 is not in the local data and the API could not be read", "HTTP 503", "try again later"]),
], ids=["api-says-404", "api-fails"])
@pytest.mark.anyio
async def test_get_test_status_of_a_test_the_api_cannot_give_is_a_clear_error(db, fault, fragments):
    faults = Faults(make_account().handler)
    if fault:
        faults.add(lambda request, n: httpx.Response(fault))
    async with mcp_client(faults) as client:
        text = await err(client, "get_test_status", {"test_id": 5})
    assert [f for f in fragments if f not in text] == [], text
    assert db_rows(db, "SELECT count(*) FROM tests WHERE id = 5") == [(0,)]


###############################################################################
# Without a token: local answers, and sync_data says how to fix it
###############################################################################

@pytest.mark.anyio
async def test_without_a_token_the_server_answers_from_the_database_and_sync_data_explains_the_fix(db, monkeypatch):
    monkeypatch.delenv("TESTIO_CUSTOMER_API_TOKEN")
    faults = Faults(make_account().handler)
    async with mcp_client(faults) as client:
        products = await ok(client, "list_products")
        running = await ok(client, "get_test_status", {"test_id": RUNNING})
        bugs = await ok(client, "list_bugs", {"test_ids": [T]})
        health = await ok(client, "health_check")
        sync = await err(client, "sync_data", {})
        missing = await err(client, "get_test_status", {"test_id": 5})
    assert [p["id"] for p in products["products"]] == sorted(PIDS, key=lambda p: NAMES[p])
    assert products["notes"] == ["TESTIO_CUSTOMER_API_TOKEN is not set, so this is the local data, never "
                                 "refreshed; set it in the MCP server's env (or ~/.testio-mcp.env) and restart, "
                                 "or try --demo"]
    assert (running["test"]["status"], running["warning"]) == ("running", None)
    assert bugs["pagination"]["total"] == len(served_bugs(T))
    assert health["token"] == {"configured": False, "accepted": None,
                               "error": "TESTIO_CUSTOMER_API_TOKEN is not set; only the local data can be queried"}
    assert health["background_sync"]["state"] == "off: TESTIO_CUSTOMER_API_TOKEN is not set"
    assert sync == ("Error executing tool sync_data: sync_data needs the TestIO API, but TESTIO_CUSTOMER_API_TOKEN "
                    "is not set; add it to the MCP server's env (or ~/.testio-mcp.env) and restart. The local data "
                    "can still be queried.")
    assert "TESTIO_CUSTOMER_API_TOKEN is not set" in missing and "test 5 is not in the local data" in missing
    assert faults.calls == 0


###############################################################################
# It says what it is doing: the running sync, no token, an API it cannot reach
###############################################################################

async def background_sync_ended(client) -> dict:
    """health_check, polled until the server's first background sync has started and ended (bounded
    by the caller): "starting" is the state before the freshness loop has looked at the data."""
    while True:
        health = await ok(client, "health_check")
        background = health["background_sync"]
        if background["state"] not in ("starting", "syncing") and not background["running_now"]:
            return health


FIRST_SYNC_NOTE = "the first sync is still running; counts will grow until it ends"


class Gated:
    """An async handler holding the requests whose path ends with `suffix` (only the first with
    `first_only`) until released: a sync in progress, part way through."""

    def __init__(self, handler, suffix: str = "/products", first_only: bool = True):
        self.handler, self.suffix, self.first_only = handler, suffix, first_only
        self.seen = 0  # requests to that path, held or not
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(self.suffix):
            self.seen += 1
            if self.seen == 1 or not self.first_only:
                self.entered.set()
                await self.release.wait()
        return self.handler(request)


@pytest.mark.slow
@pytest.mark.anyio
async def test_while_the_first_sync_runs_every_answer_says_so_and_the_log_has_its_start_and_end(
        env, monkeypatch, caplog):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="testio_mcp")
    acc = make_account()
    gate = Gated(acc.handler, "/bugs", first_only=False)
    with anyio.fail_after(WAIT):
        async with mcp_client(gate) as client:
            await gate.entered.wait()
            while (during := await ok(client, "list_products"))["sync"]["tests_so_far"] == 0:
                pass  # the first page of tests is stored right after its bugs were asked for
            missing = await err(client, "get_bug", {"bug_id": 5})
            gate.release.set()
            await background_sync_ended(client)
            after = await ok(client, "list_products")
    assert during["sync"] == {"running": True, "mode": "incremental", "trigger": "server_start",
                              "started_at": during["sync"]["started_at"],
                              "tests_so_far": during["sync"]["tests_so_far"], "bugs_so_far": 0}
    assert during["notes"] == [FIRST_SYNC_NOTE]
    assert list(during)[:2] == ["sync", "notes"]  # read first
    assert missing.endswith(f"is not in the local data; find bug ids with list_bugs, or run sync_data if it "
                            f"was reported recently ({FIRST_SYNC_NOTE})")
    assert "sync" not in after and "notes" not in after
    assert after["total"] == len(PIDS)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "testio_mcp"]
    bugs = sum(len(acc.bug_ids(product_id=p)) for p in PIDS)
    assert lines[0] == ("INFO", "background incremental sync started (server_start)")
    assert re.fullmatch(rf"background incremental sync success in \d+\.\ds: 3 products, 360 new tests, "
                        rf"0 updated, {bugs} bugs, \d+ API requests", lines[1][1]), lines
    assert [level for level, _ in lines] == ["INFO", "INFO", "INFO"]  # and "server stopped"


@pytest.mark.anyio
async def test_a_failed_background_sync_is_a_warning_and_every_answer_says_why_naming_the_base_url(
        env, monkeypatch, caplog):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="testio_mcp")
    unreachable = Faults(make_account().handler).add(lambda r, n: httpx.ConnectError("refused", request=r))
    with anyio.fail_after(WAIT):
        async with mcp_client(unreachable) as client:
            await background_sync_ended(client)
            products = await ok(client, "list_products")
    reason = (f"GET products: connection error (ConnectError) after 5 attempts from {BASE_URL}; check the "
              f"network, or TESTIO_CUSTOMER_API_BASE_URL if that is not the API's address")
    assert (products["total"], products["notes"]) == (0, [f"the last sync failed ({reason}); there is no "
                                                          f"local data yet"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "testio_mcp"]
    assert warnings == [f"background incremental sync failed: {reason}"]


@pytest.mark.anyio
async def test_without_a_token_an_empty_database_is_answered_as_no_data_yet_with_the_fix(env, monkeypatch):
    monkeypatch.delenv("TESTIO_CUSTOMER_API_TOKEN")
    async with mcp_client(make_account().handler) as client:
        products = await ok(client, "list_products")
        tests = await err(client, "list_tests", {"product_id": P})
    fix = ("TESTIO_CUSTOMER_API_TOKEN is not set, so there is no local data yet; set it in the MCP server's env "
           "(or ~/.testio-mcp.env) and restart, or try --demo")
    assert (products["total"], products["notes"]) == (0, [fix])
    assert tests.endswith(f"is not in the local data; call list_products to see the known ids, or sync_data if "
                          f"the product is new ({fix})")


###############################################################################
# sync_data: summary, progress, one sync at a time
###############################################################################

@pytest.mark.anyio
async def test_sync_data_returns_the_run_summary_and_reports_progress_per_product(db):
    acc = make_account()
    new = acc.add_tests(P, 3)
    progress = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async with mcp_client(acc.handler) as client:
        data = await ok(client, "sync_data", {}, progress_callback=on_progress)
        stats = await ok(client, "get_database_stats")
    run = data["run"]
    assert (run["mode"], run["trigger"], run["status"], run["error"], data["note"]) == (
        "incremental", "tool", "success", None, None)
    assert (run["new_tests"], run["updated_tests"], run["bugs"]) == (3, 0, sum(len(acc.bugs_of(t)) for t in new))
    assert {p["product_id"]: (p["new_tests"], p["status"]) for p in run["products"]} == {
        pid: (3 if pid == P else 0, "success") for pid in PIDS}
    assert run["run_id"] == 2 and stats["counts"]["tests"] == 363
    assert data["data_as_of"] >= run["started_at"]
    assert_matches_truth(db, acc)
    assert [value for value, _, _ in progress] == list(range(1, len(progress) + 1))
    assert {total for _, total, _ in progress} == {None}
    for pid in PIDS:
        assert any(m.startswith(f"product {pid} ({NAMES[pid]}): ") and m.endswith(", success") for _, _, m in progress)


@pytest.mark.anyio
async def test_sync_data_that_meets_a_rejected_token_mid_sync_fails_cleanly_without_stray_task_errors(db, caplog):
    caplog.set_level(logging.INFO)
    faults = Faults(make_account().handler).add(
        lambda request, n: httpx.Response(401) if not request.url.path.endswith("/products") else None)
    async with mcp_client(faults) as client:
        data = await ok(client, "sync_data", {"mode": "refresh"})
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    assert data["run"]["status"] == "failed"
    assert "the TestIO API rejected the token (HTTP 401" in data["run"]["error"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.anyio
async def test_sync_data_for_a_product_the_token_cannot_see_reports_a_failed_run_naming_it(db):
    async with mcp_client(make_account().handler) as client:
        data = await ok(client, "sync_data", {"product_ids": "99"})
    assert (data["run"]["status"], data["run"]["products"]) == ("failed", [])
    assert data["run"]["error"] == (f"product id(s) 99 are not visible to this token; visible: "
                                    f"{', '.join(map(str, sorted(PIDS)))}")


@pytest.mark.anyio
async def test_a_second_sync_data_waits_for_the_running_sync_instead_of_starting_another(db):
    acc = make_account()
    acc.add_tests(P, 2)
    gate = Gated(acc.handler)
    results, health_checks = {}, 0
    async with mcp_client(gate) as client:
        async def call(key):
            results[key] = await ok(client, "sync_data", {})

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call, "first")
                await gate.entered.wait()
                tasks.start_soon(call, "second")
                while True:  # until the second call is inside sync_data (health_check counts tool calls)
                    health = await ok(client, "health_check")
                    health_checks += 1
                    if health["tool_metrics"].get("sync_data", {}).get("calls") == 2:
                        break
                assert health["background_sync"]["running_now"] is True
                assert (health["sync"]["trigger"], health["notes"]) == (
                    "tool", ["a sync (incremental) is running; recent changes may be missing"])
                gate.release.set()
        history = (await ok(client, "get_sync_history"))["runs"]
    assert gate.seen == 1 + health_checks  # one sync read the product list; health_check the rest
    assert results["first"]["note"] is None
    assert results["second"]["note"] == "a sync was already running; this is its result"
    assert results["first"]["run"] == results["second"]["run"]
    assert results["first"]["run"]["new_tests"] == 2
    assert [(r["trigger"], r["status"]) for r in history] == [("tool", "success"), ("cli", "success")]


###############################################################################
# health_check
###############################################################################

@pytest.mark.anyio
async def test_health_check_reports_an_accepted_token_its_latency_and_api_and_tool_metrics(db):
    async with mcp_client(make_account().handler) as client:
        await ok(client, "list_products")
        await ok(client, "list_products")
        await err(client, "get_bug", {"bug_id": 5})
        data = await ok(client, "health_check")
    token = data["token"]
    assert (token["configured"], token["accepted"]) == (True, True)
    assert set(token) == {"configured", "accepted", "latency_ms"}
    assert isinstance(token["latency_ms"], float) and 0 <= token["latency_ms"] < 15_000
    assert (data["database"]["ok"], data["database"]["schema_version"], data["database"]["counts"]["tests"]) == (
        True, tm.SCHEMA_VERSION, 360)
    assert data["last_successful_sync"] == data["data_as_of"] is not None
    api = data["api_metrics"]
    assert (api["requests"], api["retries"], api["errors"]) == (1, 0, {})
    assert set(api["latency_ms"]) == {"p50", "p95", "p99"} and api["latency_ms"]["p99"] is not None
    tools = data["tool_metrics"]
    assert {k: tools["list_products"][k] for k in ("calls", "errors")} == {"calls": 2, "errors": 0}
    assert {k: tools["get_bug"][k] for k in ("calls", "errors")} == {"calls": 1, "errors": 1}
    assert tools["list_products"]["p99_ms"] >= tools["list_products"]["p50_ms"] > 0


@pytest.mark.parametrize("outcome, accepted, fragments, errors", [
    (lambda request, n: httpx.Response(401, json={"error": "You need to sign in"}), False,
     ["the TestIO API rejected the token (HTTP 401 on GET products)", "TESTIO_CUSTOMER_API_TOKEN"], {"401": 1}),
    (lambda request, n: httpx.Response(500), None,
     ["the API could not be reached to check the token", "HTTP 500 after 5 attempts"], {"500": 5}),
    (lambda request, n: httpx.ReadTimeout("timed out", request=request), None,
     ["the API could not be reached to check the token", "read timeout (30s) after 5 attempts"], {"timeout": 5}),
], ids=["401", "500", "timeout"])
@pytest.mark.anyio
async def test_health_check_reports_a_rejected_token_or_an_unreachable_api(db, outcome, accepted, fragments, errors):
    async with mcp_client(Faults(make_account().handler).add(outcome)) as client:
        data = await ok(client, "health_check")
    assert data["token"]["accepted"] is accepted
    assert [f for f in fragments if f not in data["token"]["error"]] == [], data["token"]["error"]
    assert data["api_metrics"]["errors"] == errors
    assert data["database"]["ok"] is True


###############################################################################
# Weeks unattended: a damaged cache, the background refresh, timeouts, each run's own counts
###############################################################################

def heal_note(answer: dict) -> str | None:
    """The line of an answer's notes that tells of a damaged cache replaced by a fresh one."""
    return next((n for n in answer.get("notes", ()) if n.startswith("the local cache was damaged")), None)


@pytest.mark.slow
@pytest.mark.parametrize("where", DAMAGE)
@pytest.mark.anyio
async def test_a_server_on_a_damaged_cache_answers_says_where_the_old_file_is_and_refills_a_fresh_one(
        db, where, caplog):
    damage(db, where)
    acc = make_account(products=2, tests_per_product=20, bugs_per_test=1)
    gate = Gated(acc.handler)  # the refill waits at the product list until released
    with anyio.fail_after(WAIT):
        async with mcp_client(gate) as client:
            first = await ok(client, "list_products")
            [aside] = db.parent.glob(f"{db.name}.damaged-*[0-9]Z")
            assert first["products"] == []
            assert re.fullmatch(rf"the local cache was damaged \({DAMAGE_REASON}\) and was replaced by a fresh one "
                                rf"at \S+, which a sync fills from the TestIO API; the damaged file is kept at "
                                rf"{re.escape(str(aside))}", heal_note(first))
            assert heal_note(await ok(client, "get_database_stats")) == heal_note(first)
            await gate.entered.wait()
            gate.release.set()
            while not any(r["status"] == "success" for r in (await ok(client, "get_sync_history"))["runs"]):
                pass
            after = await ok(client, "list_products")
            health = await ok(client, "health_check")
    assert heal_note(after) is None and len(after["products"]) == 2
    replaced = health["database"]["replaced_damaged_file"]
    assert (replaced["moved_to"], replaced["refilled"]) == (str(aside), True)
    assert re.fullmatch(DAMAGE_REASON, replaced["reason"])
    assert health["background_sync"]["last_status"] == "success"
    assert_told_once(caplog.text, db)


@pytest.mark.anyio
async def test_a_cache_damaged_while_the_server_runs_is_replaced_on_the_next_tool_call(db, caplog):
    acc = make_account(products=2, tests_per_product=20, bugs_per_test=1)
    gate = Gated(acc.handler)  # the refill waits at the product list until released
    with anyio.fail_after(WAIT):
        async with mcp_client(gate) as client:
            assert heal_note(await ok(client, "get_sync_history")) is None
            damage(db, "data-pages")  # pages no connection has read yet
            answer = await ok(client, "list_products")
            assert answer["products"] == [] and "the damaged file is kept at" in heal_note(answer)
            text = await err(client, "list_bugs", {"product_ids": [P]})
            assert f"sync_data if the product is new ({heal_note(answer)}" in text
            await gate.entered.wait()  # the background refill started at once (the refresh interval is 0)
            gate.release.set()
            while not any(r["status"] == "success" for r in (await ok(client, "get_sync_history"))["runs"]):
                pass
            data = await ok(client, "list_products")
    assert heal_note(data) is None and len(data["products"]) == 2
    assert_told_once(caplog.text, db)


@pytest.mark.anyio
async def test_a_sync_whose_cache_is_replaced_under_it_starts_over_on_the_fresh_one(db, caplog):
    acc = make_account(products=2, tests_per_product=20, bugs_per_test=1)
    gate = Gated(acc.handler, "/exploratory_tests")
    bug_pages = [r for (r,) in db_rows(db, "SELECT rootpage FROM sqlite_master WHERE tbl_name = 'bugs'")]
    results = {}
    with anyio.fail_after(WAIT):
        async with mcp_client(gate) as client:
            async def sync():
                results["sync"] = await ok(client, "sync_data", {})

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(sync)
                await gate.entered.wait()  # the sync stored the product list and waits for a page
                data = bytearray(db.read_bytes())
                page = int.from_bytes(data[16:18], "big")
                for root in bug_pages:  # pages nothing has read yet: the bugs
                    data[(root - 1) * page:root * page] = b"\xff" * page
                db.write_bytes(bytes(data))
                answer = await err(client, "list_bugs", {"test_ids": [T]})  # not in the fresh cache
                gate.release.set()
            health = await ok(client, "health_check")
    assert "(the local cache was damaged (database disk image is malformed)" in answer
    assert (results["sync"]["run"]["status"], results["sync"]["run"]["error"]) == ("success", None)
    assert heal_note(results["sync"]) is None and health["database"]["replaced_damaged_file"]["refilled"] is True
    assert "FOREIGN KEY" not in caplog.text
    assert_told_once(caplog.text, db)


@pytest.mark.anyio
async def test_the_background_refresh_survives_a_sqlite_error_and_succeeds_at_a_later_interval(db, monkeypatch):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0.05")
    conn = sqlite3.connect(db)
    conn.execute("CREATE TRIGGER no_runs BEFORE INSERT ON sync_runs "
                 "BEGIN SELECT RAISE(ABORT, 'database is locked'); END")
    conn.close()
    acc = make_account()
    [new] = acc.add_tests(P, 1)
    with anyio.fail_after(WAIT):
        async with mcp_client(acc.handler) as client:
            while (failed := (await ok(client, "health_check"))["background_sync"])["last_error"] is None:
                pass
            conn = sqlite3.connect(db)
            conn.execute("DROP TRIGGER no_runs")
            conn.close()
            while (done := (await ok(client, "health_check"))["background_sync"])["last_status"] != "success":
                pass
            found = await ok(client, "list_tests", {"product_id": P, "sort_by": "id", "per_page": 1})
    assert (failed["last_status"], failed["last_error"]) == ("failed", "database is locked")
    assert failed["state"] in ("idle", "syncing") and failed["last_error_at"] is not None
    assert done["consecutive_failures"] == 0 or done["state"] == "syncing"
    assert done["next_run_at"] is not None
    assert found["tests"][0]["id"] == new


class Hung:
    """An async handler that never answers (every wait on it must be bounded by the code under test)."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, request):
        self.calls += 1
        await asyncio.Event().wait()


@pytest.mark.anyio
async def test_a_tool_whose_api_call_runs_out_of_time_says_what_timed_out_and_after_how_long(db, monkeypatch):
    monkeypatch.setattr(tm, "READ_THROUGH_TIMEOUT", 0.05)
    hung = Hung()
    with anyio.fail_after(WAIT):
        async with mcp_client(hung) as client:
            text = await err(client, "get_test_status", {"test_id": 999999})
            health = await ok(client, "health_check")
    assert text == ("Error executing tool get_test_status: test 999999 is not in the local data and the API could "
                    "not be read (the API did not answer within 0.05s); try again later")
    assert health["token"]["error"] == ("the API could not be reached to check the token: the API did not answer "
                                        "within 0.05s")
    assert hung.calls == 2


async def while_a_sync_is_held(client, gate: Gated, call) -> dict:
    """sync_data's answer ("sync") and that of `call` ("during"), awaited while the sync is held."""
    results = {}

    async def sync():
        results["sync"] = await ok(client, "sync_data", {})

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(sync)
        await gate.entered.wait()
        results["during"] = await call
        gate.release.set()
    return results


@pytest.mark.anyio
async def test_sync_data_waiting_past_its_limit_for_the_running_sync_says_so_in_a_sentence(db, monkeypatch):
    monkeypatch.setattr(tm, "SYNC_WAIT_TIMEOUT", 0.05)
    acc = make_account()
    gate = Gated(acc.handler)
    with anyio.fail_after(WAIT):
        async with mcp_client(gate) as client:
            results = await while_a_sync_is_held(client, gate, err(client, "sync_data", {}))
    assert results["during"] == ("Error executing tool sync_data: a sync was already running and has not ended "
                                 "after waiting 0.05s for it; it goes on in the background: see get_sync_history "
                                 "for its result later")
    assert results["sync"]["run"]["status"] == "success"


@pytest.mark.anyio
async def test_a_runs_api_request_count_leaves_out_the_requests_a_tool_made_meanwhile(db):
    acc = make_account()
    [new] = acc.add_tests(P, 1)
    faults = Faults(acc.handler)
    gate = Gated(faults)
    with anyio.fail_after(WAIT):
        async with mcp_client(gate) as client:  # get_test_status of a new test: a read-through, 2 requests
            results = await while_a_sync_is_held(client, gate, ok(client, "get_test_status", {"test_id": new}))
            history = (await ok(client, "get_sync_history"))["runs"]
    assert results["sync"]["run"]["api_requests"] == faults.calls - 2 == history[0]["api_requests"]


###############################################################################
# Secrets: the token canary and the test environment credentials
###############################################################################

def _db_bytes(path: Path) -> bytes:
    return b"".join(Path(f"{path}{suffix}").read_bytes() for suffix in ("", "-wal", "-shm")
                    if Path(f"{path}{suffix}").exists())


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_token_reaches_no_tool_result_log_output_or_database_file(db, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    age_test(db, RUNNING)
    acc = make_account()
    acc.set_test_status(RUNNING, "locked")
    [new] = acc.add_tests(P, 1)
    fault = {"now": None}
    authorizations = set()

    def rule(request, n):
        authorizations.add(request.headers.get("authorization"))
        return {None: None, "401": httpx.Response(401, json={"error": "You need to sign in"}),
                "500": httpx.Response(500), "timeout": httpx.ReadTimeout("timed out", request=request)}[fault["now"]]

    faults = Faults(acc.handler).add(rule)
    texts, files = [], []
    async with mcp_client(faults) as client:
        for fault["now"] in ("401", "500", "timeout", None):
            for tool, args in [("health_check", {}), ("get_test_status", {"test_id": RUNNING}),
                               ("get_test_status", {"test_id": new}), ("sync_data", {"product_ids": [P]}),
                               ("list_bugs", {"test_ids": [RUNNING], "include_details": True}),
                               ("search", {"query": "token"}), ("get_sync_history", {}),
                               ("list_tests", {"product_id": 1})]:
                result = await client.call_tool(tool, args)
                texts.append(result.content[0].text)
            files.append(_db_bytes(db))
    files.append(_db_bytes(db))
    log_text = caplog.text
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    # the CLI too, at DEBUG, failing with 401 in the middle of a sync
    failing = transport_for(Faults(acc.handler).add(lambda request, n: httpx.Response(401) if n > 3 else None))
    with restored_logging():
        code, out, err_text = await anyio.to_thread.run_sync(
            lambda: cli(capfd, "sync", "--refresh", transport=failing))
    files.append(_db_bytes(db))
    assert authorizations == {f"Token {TOKEN}"}  # the token really was in use on every request
    for fragment in ("HTTP 401 on GET products", "HTTP 401 on GET exploratory_tests", "HTTP 500 after 5 attempts",
                     "read timeout (30s) after 5 attempts", "could not refresh this running test"):
        assert any(fragment in t for t in texts), fragment
    assert code == 1 and "HTTP 401" in err_text
    leaks = [where for where, blob in [("results", "\n".join(texts + RESULT_TEXTS)), ("log", log_text),
                                       ("stdout+stderr", out + err_text + "".join(capfd.readouterr()))]
             if TOKEN in blob]
    leaks += [f"database file snapshot {i}" for i, blob in enumerate(files) if TOKEN.encode() in blob]
    assert leaks == []


@pytest.mark.anyio
async def test_test_environment_credentials_never_reach_the_database_or_any_answer(db):
    acc = make_account()
    [new] = acc.add_tests(P, 1)  # stored by read-through, the other tests by the CLI sync
    environments = [t["test_environment"] for pid in PIDS for t in served_tests(pid)]
    environments.append(acc.test_json(new)["test_environment"])
    secrets = sorted({e[k] for e in environments for k in ("password", "url", "access")} | {"qa-user"})
    assert all(e["password"].startswith("demo-secret-") for e in environments)  # the fake does serve them
    texts = []
    async with mcp_client(acc.handler) as client:
        for test_id in (new, T, RUNNING):
            data = await ok(client, "get_test_status", {"test_id": test_id})
            texts.append(json.dumps(data))
        assert data["test"]["environment"] == acc.test_json(RUNNING)["test_environment"]["title"]  # the title stays
        for query in ("demo secret", "qa user", "staging", "password", "Log in with username", "access"):
            texts.append(json.dumps(await ok(client, "search", {"query": query, "limit": 200})))
        texts.append(json.dumps(await ok(client, "list_tests", {"product_id": P, "per_page": 200})))
        texts.append(json.dumps(await ok(client, "list_bugs", {"test_ids": [T, RUNNING], "include_details": True})))
        raw = _db_bytes(db)
    assert [s for s in secrets if s.encode() in raw] == []
    assert [s for s in secrets if any(s in t for t in texts)] == []


###############################################################################
# Generated arguments: a result or a clear error, never a crash or SQL text
###############################################################################

HOSTILE = [None, True, False, 0, -1, 1, 2, 3, 2**31, 2**63, -(2**63) - 1, 10**40, 1.5, -0.0, 1e308,
           "", " ", "0", "-1", "1,2", "1,,2", ",", "9" * 40, "a" * 5000, "2026-02-30", "2026-01-01", "1999-12-31",
           "9999-12-31", "0001-01-01",
           "20260101", "' OR 1=1 --", '"; DROP TABLE bugs; --', "NEAR(a b)", "a OR b", "*", '"', "^", "🐛", "ß",
           "\x00", "²", "١٢", "%", "_", "\\", "null", "[1]", '{"a": 1}', [], [1], [0], [-1], ["x"], [None],
           [[1]], [1.5], ["1", 2], {}, {"a": 1}, {"product_ids": [1]}, {"severities": "low"}, {"testers": [None]}]


FIGURES: dict = {}  # what the generated-arguments test ran, for the report


def _valid_values(acc) -> dict[str, list]:
    pid = acc.product_ids()[0]
    tests = acc.test_ids(pid)
    bug = acc.bug_ids(product_id=pid)[0]
    return {"product_id": [pid], "product_ids": [[pid], str(pid), ",".join(map(str, acc.product_ids()))],
            "test_id": tests[:3] + tests[-3:], "test_ids": [[tests[10]], f"{tests[10]},{tests[11]}"],
            "bug_id": [bug], "statuses": [["locked"], "archived,locked"], "status": ["open", ["rejected"]],
            "severity": ["critical", ["low", "high"]], "bug_type": ["visual"], "rejection_reason": ["known_bug"],
            "known": [True, False], "tester": ["clara_dubois_123"], "testing_type": ["custom", "test_case"],
            "start_date": ["2025-01-01"], "end_date": ["2026-12-31"], "sort_by": ["title", "bug_count", "month"],
            "sort_order": ["asc"], "page": [1, 2], "per_page": [1, 200], "include_details": [True],
            "search": ["log", "Demo"], "product_type": ["website"],
            "metrics": [["bug_count"], "test_count,rejection_rate", ["features_tested", "bugs_per_test"]],
            "dimensions": [["severity"], "product,month", ["feature"], "known,tester"],
            "filters": [{"severities": ["low"]}, {"product_ids": [pid]}, {"bug_statuses": "rejected"}],
            "query": ["checkout", "log*", "login button"], "entities": [["bug"], "test,feature"],
            "limit": [1, 5, 50], "mode": ["incremental", "refresh"],
            "since": ["2026-11-01", "2026-11-20T09:00:00+01:00"], "kinds": [["bug_new"], "test_status,bug_status"],
            "compare": ["previous", "2025-01-01..2025-03-31"]}


def generated_arguments(rng: random.Random, schema: dict, valid: dict[str, list]) -> dict:
    """An argument set: each parameter left out, valid, or hostile; sometimes an extra key."""
    args = {}
    required = set(schema.get("required", []))
    for name in schema.get("properties", {}):
        roll = rng.random()
        if roll < (0.1 if name in required else 0.4):
            continue
        pool = valid.get(name) if roll < 0.7 and valid.get(name) else HOSTILE
        args[name] = rng.choice(pool)
    if rng.random() < 0.15:
        args[rng.choice(["bogus", "product", "__proto__", "arguments"])] = rng.choice(HOSTILE)
    return args


@pytest.mark.slow
@pytest.mark.anyio
async def test_every_tool_answers_hundreds_of_generated_argument_sets_with_a_result_or_a_clear_error(
        env, monkeypatch, caplog, capfd):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    caplog.set_level(logging.INFO)
    acc = make_account(products=2, tests_per_product=30)
    valid = _valid_values(acc)
    rng = random.Random(20261127)
    outcomes: collections.Counter = collections.Counter()
    problems = []
    async with mcp_client(acc.handler) as client:
        await ok(client, "sync_data", {})
        tools = (await client.list_tools()).tools
        for tool in sorted(tools, key=lambda t: t.name):
            for _ in range(60 if tool.name == "sync_data" else 250):
                args = generated_arguments(rng, tool.input_schema, valid)
                result = await client.call_tool(tool.name, args)
                text = result.content[0].text if result.content else ""
                outcomes[(tool.name, bool(result.is_error))] += 1
                bad = (not text or TOKEN in text or "failed unexpectedly" in text
                       or any(word in text.lower() for word in SQL_LEAKS)
                       or (not result.is_error and "data_as_of" not in (result.structured_content or {})))
                if bad:
                    problems.append((tool.name, args, text[:300]))
    FIGURES["fuzz"] = {"argument sets": sum(outcomes.values()), "tools": len(tools),
                       "errors": sum(n for (_, error), n in outcomes.items() if error),
                       "results": sum(n for (_, error), n in outcomes.items() if not error)}
    assert problems == []
    assert {name for name, _ in outcomes} == set(TOOLS)
    # every tool answered some sets with a result, and rejected some with an error
    assert {name for (name, error) in outcomes if not error} == set(TOOLS)
    assert {name for (name, error) in outcomes if error} == set(TOOLS) - {"health_check", "get_database_stats"}
    crashes = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert crashes == []
    assert "Traceback" not in "".join(capfd.readouterr())



###############################################################################
# stdio: the SDK client against a real subprocess, raw JSON-RPC over pipes, shutdown
###############################################################################

class Lines:
    """A pipe read line by line on a thread, so every wait for output is bounded."""

    def __init__(self, pipe):
        self.lines: list[bytes] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe) -> None:
        for line in iter(pipe.readline, b""):
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def next(self, deadline: float) -> bytes | None:
        """The next line (None at EOF); queue.Empty when the deadline passes."""
        return self._queue.get(timeout=max(0.0, deadline - time.monotonic()))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(deadline)
            assert line is not None, f"the process ended without printing {text!r}"
            if text in line.decode("utf-8", "replace"):
                return


@contextlib.contextmanager
def busy_port():
    """A port taken on every address, IPv4 and IPv6: a server that should refuse to start but starts
    anyway fails to bind it instead of serving until the test times out."""
    with contextlib.ExitStack() as stack:
        busy = stack.enter_context(socket.socket())
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        with contextlib.suppress(OSError):  # where the machine has IPv6
            busy6 = stack.enter_context(socket.socket(socket.AF_INET6))
            busy6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            busy6.bind(("::", busy.getsockname()[1]))
            busy6.listen()
        yield str(busy.getsockname()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(home: Path, db_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "TESTIO_DB_PATH": str(db_path),
            "TESTIO_REFRESH_INTERVAL_SECONDS": "0", **extra}


@pytest.mark.slow
@pytest.mark.anyio
async def test_stdio_subprocess_initializes_lists_the_tools_and_answers_with_demo_data(tmp_path, demo_template):
    template, pid = demo_template
    (tmp_path / "data").mkdir()
    shutil.copyfile(template, tmp_path / "data" / "demo.db")
    params = StdioServerParameters(command=sys.executable, args=[str(HERE / "testio_mcp.py"), "--demo"],
                                   env=child_env(tmp_path, tmp_path / "data" / "cache.db"), cwd=str(tmp_path))
    with anyio.fail_after(SUBPROCESS_TIMEOUT):
        async with Client(params, mode="legacy") as client:
            tools = (await client.list_tools()).tools
            products = await ok(client, "list_products")
            tests = await ok(client, "list_tests", {"product_id": pid, "per_page": 5})
    demo = demo_truth()
    assert sorted(t.name for t in tools) == sorted(TOOLS)
    assert [(p["id"], p["name"]) for p in products["products"]] == sorted(
        ((p["id"], p["name"]) for p in demo.products_json()), key=lambda p: p[1])
    assert products["products"][0]["name"].startswith("Demo · ")
    assert [t["id"] for t in tests["tests"]] == demo.test_ids(pid)[:5]


def _raw_session(tmp_path: Path, synced_template: Path, spoil: str | None = None) -> subprocess.Popen:
    """testio_mcp.py over stdio with the canary token, DEBUG logs, and an API port nobody listens on;
    `spoil`: damage the database first (see damage())."""
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copyfile(synced_template, tmp_path / "data" / "cache.db")
    if spoil:
        damage(tmp_path / "data" / "cache.db", spoil)
    env = child_env(tmp_path, tmp_path / "data" / "cache.db", TESTIO_CUSTOMER_API_TOKEN=TOKEN, LOG_LEVEL="DEBUG",
                    TESTIO_CUSTOMER_API_BASE_URL=f"http://127.0.0.1:{free_port()}/customer/v2",
                    TESTIO_RETRY_BASE_SECONDS="0", TESTIO_HTTP_TIMEOUT_SECONDS="5")
    return subprocess.Popen([sys.executable, str(HERE / "testio_mcp.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))


def _send(proc: subprocess.Popen, *messages: dict) -> None:
    for message in messages:
        proc.stdin.write((json.dumps(message) + "\n").encode())
    proc.stdin.flush()


def _replies(out: Lines, ids: set[int], timeout: float = SUBPROCESS_TIMEOUT) -> dict[int, dict]:
    deadline, replies = time.monotonic() + timeout, {}
    while not ids <= set(replies):
        line = out.next(deadline)
        assert line is not None, f"stdout closed before the replies to {ids - set(replies)}"
        message = json.loads(line)
        if "id" in message:
            replies[message["id"]] = message
    return replies


def _call(request_id: int, name: str, arguments: dict) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}}


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "raw-pipe-test", "version": "0"}}}


def _assert_every_line_is_json_rpc(lines: list[bytes]) -> None:
    for line in lines:
        message = json.loads(line)  # one message per line, nothing else on stdout
        assert message["jsonrpc"] == "2.0"
        assert ("id" in message and ("result" in message or "error" in message)) or "method" in message, message


def _stopped_within(proc, stop, seconds=2.0):
    """Run stop() (close stdin, send SIGTERM); the exit code, which must come within `seconds`."""
    stop()
    started = time.monotonic()
    code = proc.wait(timeout=seconds)
    assert time.monotonic() - started < seconds
    return code


def _reap(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_stdio_stdout_carries_only_json_rpc_and_stdin_eof_ends_the_server_cleanly(tmp_path, synced_template):
    proc = _raw_session(tmp_path, synced_template)
    try:
        out, err_lines = Lines(proc.stdout), Lines(proc.stderr)
        _send(proc, INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"},
              {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
              _call(3, "list_products", {}),
              _call(4, "list_tests", {"product_id": "abc"}),
              _call(5, "no_such_tool", {}),
              _call(6, "get_test_status", {"test_id": 5}),
              _call(7, "health_check", {}),
              {"jsonrpc": "2.0", "id": 8, "method": "no/such"},
              _call(9, "search", {"query": '" OR 1=1 --'}),
              _call(10, "list_bugs", {"test_ids": [T], "include_details": True, "per_page": 200}))
        replies = _replies(out, set(range(1, 11)))
        code = _stopped_within(proc, proc.stdin.close)
    finally:
        _reap(proc)
    assert code == 0
    assert replies[1]["result"]["protocolVersion"] == "2025-06-18"
    assert replies[1]["result"]["serverInfo"]["name"] == "testio-mcp"
    assert sorted(t["name"] for t in replies[2]["result"]["tools"]) == sorted(TOOLS)
    assert replies[3]["result"]["structuredContent"]["total"] == 3
    text = {i: replies[i]["result"]["content"][0]["text"] for i in (4, 5, 6, 9, 10)}
    assert replies[4]["result"]["isError"] and "product_id" in text[4] and "'abc'" in text[4]
    assert replies[5]["result"] == {"content": [{"type": "text", "text": "Unknown tool: no_such_tool"}],
                                    "isError": True}
    assert replies[6]["result"]["isError"] and "could not be read (GET exploratory_tests/5: connection error" in text[6]
    assert replies[7]["result"]["structuredContent"]["token"]["accepted"] is None
    assert replies[8]["error"]["code"] == -32601
    assert replies[9]["result"]["isError"] is False
    assert replies[10]["result"]["structuredContent"]["pagination"]["total"] == len(served_bugs(T))
    _assert_every_line_is_json_rpc(out.lines)
    stderr = b"".join(err_lines.lines).decode()
    assert " DEBUG " in stderr and "Traceback" not in stderr
    assert TOKEN not in stderr and TOKEN.encode() not in b"".join(out.lines)


@pytest.mark.slow
def test_stdio_server_on_a_damaged_cache_initializes_and_answers_with_the_note(tmp_path, synced_template):
    proc = _raw_session(tmp_path, synced_template, spoil="header")
    try:
        out, err_lines = Lines(proc.stdout), Lines(proc.stderr)
        _send(proc, INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"},
              _call(2, "get_database_stats", {}))
        replies = _replies(out, {1, 2})
        code = _stopped_within(proc, proc.stdin.close)
    finally:
        _reap(proc)
    assert code == 0
    assert replies[1]["result"]["serverInfo"]["name"] == "testio-mcp"
    stats = replies[2]["result"]["structuredContent"]
    assert stats["counts"]["tests"] == 0 and "the damaged file is kept at" in heal_note(stats)
    stderr = b"".join(err_lines.lines).decode()
    assert "Traceback" not in stderr
    assert_told_once(stderr, tmp_path / "data" / "cache.db")


@pytest.mark.slow
def test_stdio_server_exits_within_two_seconds_on_sigterm(tmp_path, synced_template):
    proc = _raw_session(tmp_path, synced_template)
    try:
        out = Lines(proc.stdout)
        Lines(proc.stderr)
        _send(proc, INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"},
              {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert len(_replies(out, {1, 2})[2]["result"]["tools"]) == len(TOOLS)
        code = _stopped_within(proc, lambda: proc.send_signal(signal.SIGTERM))
    finally:
        _reap(proc)
    assert code == 0
    _assert_every_line_is_json_rpc(out.lines)


###############################################################################
# Streamable HTTP: DNS-rebinding checks on loopback; off loopback only with the bearer token
###############################################################################

MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@contextlib.asynccontextmanager
async def served_http(tmp_path, demo_template, argv, **env):
    """`testio_mcp.py *argv` (PORT replaced by a free port) on a copy of the demo database; yields
    (the /mcp URL on 127.0.0.1, its stderr Lines) once it listens; SIGTERM (then kill) afterwards."""
    (tmp_path / "data").mkdir()
    shutil.copyfile(demo_template[0], tmp_path / "data" / "demo.db")
    port = free_port()
    argv = [str(port) if arg == "PORT" else arg for arg in argv]
    proc = subprocess.Popen([sys.executable, str(HERE / "testio_mcp.py"), *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(tmp_path, tmp_path / "data" / "cache.db", **env), cwd=str(tmp_path))
    try:
        err_lines = Lines(proc.stderr)
        Lines(proc.stdout)
        await anyio.to_thread.run_sync(err_lines.wait_for, "testio-mcp: MCP over HTTP at ", SUBPROCESS_TIMEOUT)
        yield f"http://127.0.0.1:{port}/mcp", err_lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.anyio
async def test_http_subprocess_serves_the_tools_and_refuses_foreign_origin_foreign_host_and_bad_json(
        tmp_path, demo_template):
    async with served_http(tmp_path, demo_template, ["serve", "--transport", "http", "--port", "PORT",
                                                      "--demo"]) as (url, err_lines):
        with anyio.fail_after(SUBPROCESS_TIMEOUT):
            async with Client(url, mode="legacy") as client:  # loopback: no token needed
                tools = (await client.list_tools()).tools
                products = await ok(client, "list_products")
            local = url.replace("127.0.0.1", "localhost")
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                foreign_origin = await http.post(url, json=INITIALIZE, headers={**MCP_HEADERS,
                                                                                "Origin": "http://evil.example.com"})
                foreign_host = await http.post(url, json=INITIALIZE, headers={**MCP_HEADERS,
                                                                              "Host": "evil.example.com"})
                not_json = await http.post(url, content=b"{this is not json", headers=MCP_HEADERS)
                local_origin = await http.post(url, json=INITIALIZE, headers={**MCP_HEADERS,
                                                                              "Origin": local.removesuffix("/mcp")})
    assert sorted(t.name for t in tools) == sorted(TOOLS)
    assert demo_template[1] in [p["id"] for p in products["products"]]
    assert len(products["products"]) == len(demo_truth().product_ids())
    assert (foreign_origin.status_code, foreign_host.status_code, not_json.status_code) == (403, 421, 400)
    assert local_origin.status_code == 200
    assert "Traceback" not in b"".join(err_lines.lines).decode()


def _readme_team_setup() -> tuple[list[str], dict, str]:
    """README's team setup: the server command (argv after `testio-mcp`), the client JSON config, and
    the value of `claude mcp add ... --header`."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Team setup"):]
    section = section[:section.index("\n## ", 1)]
    server = next(line for line in section.splitlines() if line.startswith("testio-mcp serve"))
    config = json.loads(re.search(r"```json\n(.*?)```", section, re.DOTALL).group(1))
    claude = shlex.split(next(line for line in section.splitlines() if line.startswith("claude mcp add")))
    return shlex.split(server)[1:], config, claude[claude.index("--header") + 1]


@pytest.mark.slow
@pytest.mark.anyio
async def test_http_off_loopback_answers_only_requests_that_carry_the_bearer_token(tmp_path, demo_template):
    argv, config, claude_header = _readme_team_setup()  # README's own commands, on a free port, --demo
    assert "0.0.0.0" in argv and "--allow-remote" in argv
    argv = ["PORT" if arg == "8080" else arg for arg in argv] + ["--demo"]
    # ${VAR} as Claude Code expands it in .mcp.json, $VAR as the shell does on the claude command line
    expand = functools.partial(re.sub, r"\$\{?TESTIO_MCP_HTTP_TOKEN\}?", HTTP_TOKEN)
    async with served_http(tmp_path, demo_template, argv, TESTIO_MCP_HTTP_TOKEN=HTTP_TOKEN,
                           LOG_LEVEL="DEBUG") as (url, err_lines):  # bound to 0.0.0.0, reached via 127.0.0.1
        with anyio.fail_after(SUBPROCESS_TIMEOUT):
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                answers = {name: await http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **extra})
                           for name, extra in [
                               ("none", {}),
                               ("wrong", {"Authorization": f"Bearer {HTTP_TOKEN[:-1]}x"}),
                               ("prefix", {"Authorization": f"Bearer {HTTP_TOKEN[:-1]}"}),
                               ("basic", {"Authorization": f"Basic {HTTP_TOKEN}"}),
                               ("bare", {"Authorization": HTTP_TOKEN}),
                               ("right", {"Authorization": f"Bearer {HTTP_TOKEN}"}),
                               ("lowercase scheme", {"Authorization": f"bearer {HTTP_TOKEN}"}),
                               ("claude mcp add --header", dict([map(str.strip, expand(claude_header)
                                                                     .split(":", 1))])),
                               ("any Host once authorized", {"Authorization": f"Bearer {HTTP_TOKEN}",
                                                             "Host": "testio.example.com"})]}
                other_path = await http.get(url.replace("/mcp", "/anything"))
            entry = config["mcpServers"]["testio"]
            headers = {name: expand(value) for name, value in entry["headers"].items()}
            assert entry["type"] == "http" and entry["url"].endswith(":8080/mcp")
            async with httpx2.AsyncClient(headers=headers) as with_token, \
                    Client(streamable_http_client(url, http_client=with_token), mode="legacy") as client:
                tools = (await client.list_tools()).tools
                health = await client.call_tool("health_check", {})
                products = await ok(client, "list_products")
    status = {name: answer.status_code for name, answer in answers.items()}
    assert status == {"none": 401, "wrong": 401, "prefix": 401, "basic": 401, "bare": 401, "right": 200,
                      "lowercase scheme": 200, "claude mcp add --header": 200, "any Host once authorized": 200}
    assert answers["none"].headers["www-authenticate"] == 'Bearer realm="testio-mcp"'
    assert answers["wrong"].headers["www-authenticate"] == 'Bearer realm="testio-mcp", error="invalid_token"'
    assert answers["none"].json()["error_description"] == ("send the header Authorization: Bearer <token>, "
                                                           "the token set in the server's TESTIO_MCP_HTTP_TOKEN")
    assert other_path.status_code == 401
    assert sorted(t.name for t in tools) == sorted(TOOLS)
    assert demo_template[1] in [p["id"] for p in products["products"]]
    stderr = b"".join(err_lines.lines).decode()
    assert "HTTP 401 for 127.0.0.1: no Authorization header" in stderr
    assert "HTTP 401 for 127.0.0.1: wrong bearer token" in stderr
    assert " DEBUG " in stderr and "Traceback" not in stderr
    shown = [stderr, health.content[0].text, *(answer.text for answer in answers.values() if answer.text)]
    assert not any(HTTP_TOKEN in text or HTTP_TOKEN[:-1] in text for text in shown)


@pytest.mark.slow
@pytest.mark.anyio
async def test_http_on_loopback_with_a_token_set_requires_it_and_keeps_the_host_checks(tmp_path,
                                                                                        demo_template):
    argv = ["serve", "--transport", "http", "--port", "PORT", "--demo"]
    async with served_http(tmp_path, demo_template, argv,
                           TESTIO_MCP_HTTP_TOKEN=HTTP_TOKEN) as (url, err_lines):
        with anyio.fail_after(SUBPROCESS_TIMEOUT):
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                right = {"Authorization": f"Bearer {HTTP_TOKEN}"}
                none = await http.post(url, json=INITIALIZE, headers=MCP_HEADERS)
                authorized = await http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **right})
                foreign_host = await http.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **right,
                                                                              "Host": "evil.example.com"})
    assert (none.status_code, authorized.status_code, foreign_host.status_code) == (401, 200, 421)
    assert "(requests need Authorization: Bearer $TESTIO_MCP_HTTP_TOKEN)" in b"".join(err_lines.lines).decode()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_http_off_loopback_without_a_token_refuses_to_start_with_one_sentence(env, capsys, host):
    with busy_port() as port, restored_logging():
        code, out, err = cli(capsys, "serve", "--transport", "http", "--host", host, "--port", port,
                             "--allow-remote")
    assert (code, out) == (1, "")
    assert one_line(err) == (f"testio-mcp: --host {host} is reachable from other machines and "
                             "TESTIO_MCP_HTTP_TOKEN is not set: set it to a random secret (python3 -c "
                             "'import secrets; print(secrets.token_urlsafe(32))') and have clients send "
                             "Authorization: Bearer <that secret>")
    assert not env.exists()


def test_http_on_a_non_loopback_host_without_allow_remote_exits_with_a_clear_message(env, capsys):
    with restored_logging():
        code, out, err_text = cli(capsys, "serve", "--transport", "http", "--host", "0.0.0.0", "--port", "9")
    assert (code, out) == (1, "")
    assert err_text.strip().endswith("testio-mcp: --host 0.0.0.0 is not a loopback address: anyone who can reach it "
                                     "could read your TestIO data; to serve a team add --allow-remote and set "
                                     "TESTIO_MCP_HTTP_TOKEN")


def test_readme_team_setup_makes_a_token_the_server_accepts(env):
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    recipe = re.search(r'TESTIO_MCP_HTTP_TOKEN="\$\((python3 -c .*?)\)"', readme).group(1)
    made = subprocess.run([sys.executable, *shlex.split(recipe)[1:]], capture_output=True, text=True,
                          timeout=WAIT).stdout.strip()
    assert tm.Settings.from_env({"TESTIO_MCP_HTTP_TOKEN": made}).http_token == made


###############################################################################
# Demo account: it lives with the clock, and each sync stores what it changed
###############################################################################

def served_statuses(acc: Account, product_id: int | None = None) -> tuple[dict, dict]:
    """served_state() as test id -> status, bug id -> status as the tools show it."""
    state = served_state(acc, product_id)
    return ({t: test["status"] for t, test in state["tests"].items()},
            {b: bug["status"] for b, bug in state["bugs"].items()})


def stored_state(db_path: Path, product_id: int | None = None) -> tuple[dict, dict]:
    """The same from the local copy."""
    where, args = ("WHERE product_id = ?", (product_id,)) if product_id else ("", ())
    return (dict(db_rows(db_path, f"SELECT id, status FROM tests {where}", args)),
            dict(db_rows(db_path, f"SELECT id, status FROM bugs {where}", args)))


def status_changes(before: tuple[dict, dict], after: tuple[dict, dict]) -> dict[str, set]:
    """An independent diff of two states: new tests, status steps, new bugs, reviews."""
    (tests0, bugs0), (tests1, bugs1) = before, after
    kept = bugs0.keys() & bugs1.keys()
    return {"new_tests": tests1.keys() - tests0.keys(),
            "status_steps": {(tests0[t], tests1[t]) for t in tests0.keys() & tests1.keys()
                             if tests0[t] != tests1[t]},
            "new_bugs": bugs1.keys() - bugs0.keys(),
            "reviewed": {b for b in kept if bugs0[b] == "open" and bugs1[b] in ("accepted", "rejected")},
            "auto_accepted": {b for b in kept if bugs0[b] == "open" and bugs1[b] == "auto_accepted"}}


def test_a_day_later_a_refresh_sync_stores_the_new_tests_status_steps_new_bugs_and_reviews(env, capsys):
    acc = make_account(products=1, tests_per_product=760, bugs_per_test=2)  # a new test about daily
    transport = mock(acc.handler)
    assert cli(capsys, "sync", transport=transport)[0] == 0
    before = served_statuses(acc)
    assert stored_state(env) == before
    acc.advance(timedelta(days=1))
    after = served_statuses(acc)
    changed = status_changes(before, after)
    assert {kind: bool(found) for kind, found in changed.items()} == dict.fromkeys(changed, True)
    assert changed["status_steps"] >= {("running", "locked"), ("initialized", "customer_finalized")}
    # a review does not change the test's status: the refresh (the server's background mode) reads it
    code, _, err = cli(capsys, "sync", "--refresh", transport=transport)
    assert code == 0, err
    assert stored_state(env) == after
    assert_matches_truth(env, acc)


def test_the_same_seed_at_the_same_time_gives_the_same_data_whatever_steps_led_there(
        env, capsys, monkeypatch):
    stepped = make_account(bugs_per_test=2)
    with httpx.Client(transport=mock(stepped.handler), base_url=BASE_URL,
                      headers={"Authorization": f"Token {TOKEN}"}) as api:
        for hours in (1, 5, 18, 48, 100):  # it answers at each step on the way
            stepped.advance(timedelta(hours=hours))
            assert api.get(f"products/{P}/exploratory_tests", params={"page": 1}).status_code == 200
    direct = make_account(bugs_per_test=2, at=NOW + timedelta(hours=172))
    synced = []
    for name, acc in (("stepped", stepped), ("direct", direct), ("still", make_account(bugs_per_test=2))):
        db_path = env.with_name(f"{name}.db")
        monkeypatch.setenv("TESTIO_DB_PATH", str(db_path))
        assert cli(capsys, "sync", transport=mock(acc.handler))[0] == 0
        synced.append((db_rows(db_path, "SELECT id, status, start_at, end_at, raw FROM tests ORDER BY id"),
                       db_rows(db_path, "SELECT id, status, reported_at, exported_at, raw FROM bugs "
                                        "ORDER BY id")))
    assert synced[0] == synced[1]
    assert synced[0] != synced[2]  # the week did change the account


def test_a_first_demo_sync_that_fails_says_why_once_and_stores_nothing(env, capsys):
    code, _, err = cli(capsys, "--demo", "sync", "--product-ids", "5")
    assert code == 1
    demo_db = env.with_name("demo.db")
    assert db_rows(demo_db, "SELECT trigger, mode, status FROM sync_runs") == [
        ("demo_history", "incremental", "failed")]
    assert db_rows(demo_db, "SELECT count(*) FROM tests") == [(0,)]
    assert "a refresh brings it to now" not in err


@pytest.mark.slow
def test_a_first_demo_sync_reads_the_week_before_so_changes_and_the_review_queue_show_a_week(
        env, capsys, monkeypatch):
    clock = NOW + timedelta(hours=9)
    monkeypatch.setattr(tm, "utc_now", lambda: clock)  # the demo's clock, and the syncs' own
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    code, out, err = cli(capsys, "sync", "--demo")
    assert code == 0, err
    products = tm.DEMO_ACCOUNT["products"]
    assert len(re.findall(r"^product \d+: ", err, re.M)) == 2 * products  # the history's progress too
    demo_db = env.with_name("demo.db")
    assert db_rows(demo_db, "SELECT id, trigger, status FROM sync_runs ORDER BY id") == [
        (1, "demo_history", "success"), (2, "cli", "success")]
    assert db_rows(demo_db, "SELECT mode FROM sync_runs WHERE id = 2") == [("refresh",)]
    served = served_statuses(Account(**tm.DEMO_ACCOUNT, at=clock))
    stored = stored_state(demo_db)[0]  # brought to now by the second sync (tests that left stay)
    assert {t: stored.get(t) for t in served[0]} == served[0]
    runtime = tm.Runtime(tm.Settings.from_env(demo=True),
                         transport_for(Account(**tm.DEMO_ACCOUNT, at=clock).handler))

    async def ask():
        async with Client(tm.build_server(runtime), mode="legacy") as client:
            return [(await client.call_tool(tool, {"per_page": 1})).structured_content
                    for tool in ("get_changes", "get_review_queue")]
    changes, queue = asyncio.run(ask())
    kinds = {kind for product in changes["summary"] for kind in product["by_kind"]}
    assert {"test_new", "test_status", "bug_new", "bug_status"} <= kinds
    assert changes["pagination"]["total"] > 100 and queue["summary"]["open_bugs"] > 0
    assert queue["summary"]["stale_bugs"] == 0


@pytest.mark.slow
def test_the_demo_account_has_bugs_awaiting_review_at_any_time():
    for days in range(0, 366, 61):  # a year, at different hours
        at = NOW + timedelta(days=days, hours=days % 24)
        demo, window_start = Account(**tm.DEMO_ACCOUNT, at=at), tm.iso(at - timedelta(days=10))
        awaiting = 0
        for pid in demo.product_ids():
            for test_id in demo.test_ids(pid):  # newest end first
                end = utc(demo.test_json(test_id)["end_at"])
                if end <= window_start:
                    break
                if end <= tm.iso(at):
                    awaiting += sum(shown_status(b) == "open" for b in demo.bugs_of(test_id))
        assert awaiting > 0, at


@pytest.mark.slow
def test_the_demo_account_moves_on_with_the_clock_and_two_syncs_days_apart_store_what_changed(
        env, capsys, monkeypatch):
    clock = [NOW + timedelta(hours=9)]
    monkeypatch.setattr(tm, "utc_now", lambda: clock[0])  # the demo's clock, and the syncs' own
    pid = str(demo_truth().product_ids()[0])
    demo_db = env.with_name("demo.db")
    assert cli(capsys, "--demo", "sync", "--product-ids", pid)[0] == 0
    before = stored_state(demo_db)
    clock[0] += timedelta(days=2)  # one product: a day may pass without an auto-acceptance
    assert cli(capsys, "--demo", "sync", "--refresh", "--product-ids", pid)[0] == 0
    after = stored_state(demo_db)
    changed = status_changes(before, after)
    assert {kind: bool(found) for kind, found in changed.items()} == dict.fromkeys(changed, True)
    served = served_statuses(Account(**tm.DEMO_ACCOUNT, at=clock[0]), int(pid))
    # tests that left the account meanwhile (ended 760 days ago) stay until a --force sync
    left = after[0].keys() - served[0].keys()
    assert {after[0][t] for t in left} <= {"archived", "cancelled"}
    kept_bugs = dict(db_rows(demo_db, "SELECT id, status FROM bugs WHERE test_id NOT IN "
                                      f"({','.join(map(str, left)) or 'NULL'})"))
    assert ({t: s for t, s in after[0].items() if t not in left}, kept_bugs) == served
    # the review queue: open bugs of tests that ended within the 10-day review window
    open_in_window = db_rows(demo_db, "SELECT count(*) FROM bugs b JOIN tests t ON t.id = b.test_id "
                                      "WHERE b.status = 'open' AND t.end_at > ? AND t.end_at <= ?",
                             (tm.iso(clock[0] - timedelta(days=10)), tm.iso(clock[0])))[0][0]
    assert open_in_window > 0

###############################################################################
# Docs stay honest
###############################################################################

def _cli_commands(parser) -> list[str]:
    commands = []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            commands.append(name)
            commands += [f"{name} {nested}" for nested in _cli_commands(sub)]
    return commands


def test_readme_names_every_tool_and_every_cli_command():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    names = [*TOOLS, *_cli_commands(tm.build_parser())]
    assert len(names) == 16 + 7
    assert [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", readme)] == []


def test_readme_names_every_prompt_and_resource():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert [name for name in [*tm.PROMPTS, *tm.RESOURCES] if f"`{name}`" not in readme] == []


CHECKOUT = ("/path/to/checkout", "C:\\path\\to\\checkout", ".")  # README's placeholders; "." in the checkout


def _distribution() -> str:
    return re.search(r'^name = "([^"]+)"', (HERE / "pyproject.toml").read_text(), flags=re.M).group(1)


def _started_from(argv: list[str]) -> str | None:
    """The distribution or checkout a command line starts testio-mcp from; None if it starts no server.
    uvx and pipx must be told the distribution: by its bare name they run the index's testio-mcp."""
    if argv[:3] == ["claude", "mcp", "add"]:  # without `--`: a client of a running HTTP server
        return _started_from(argv[argv.index("--") + 1:]) if "--" in argv else None
    if argv[0] == "uvx":
        assert argv[1] == "--from" and argv[3] == "testio-mcp", f"uvx names no distribution: {argv}"
        return argv[2]
    if argv[0] == "pipx":
        assert argv[1:3] == ["run", "--spec"] and argv[4] == "testio-mcp", f"pipx names no distribution: {argv}"
        return argv[3]
    venv = re.fullmatch(r"(?:(.*?)[/\\])?\.venv[/\\](?:bin/testio-mcp|Scripts\\testio-mcp(?:\.exe)?)", argv[0])
    if venv:
        return venv.group(1) or "."
    assert "testio-mcp" not in " ".join(argv) or argv[0] == "testio-mcp", f"how does this start? {argv}"
    return None


def test_every_readme_snippet_that_starts_the_server_names_this_distribution_or_a_checkout():
    dist = _distribution()
    assert dist != "testio-mcp"  # on the package index that name is another project's
    starts = []  # (where, argv)
    for lang, text in readme_code_blocks():
        if lang == "json":
            for name, server in json.loads(text)["mcpServers"].items():
                if "command" in server:  # else a client of a running HTTP server: it starts nothing
                    starts.append((f"JSON {name}", [server["command"], *server["args"]]))
                else:
                    assert server["type"] == "http" and server["url"].endswith("/mcp"), server
        elif lang in ("bash", "bat"):
            for line in text.splitlines():
                for command in line.split(" && "):
                    argv = shlex.split(command, comments=True) if lang == "bash" else command.split()
                    starts.append((lang, argv))
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    for span in re.findall(r"`([^`\n]+)`", readme):
        argv = span.split()
        if len(argv) > 1 and argv[0] in ("uvx", "pipx", "claude") or argv and ".venv" in argv[0]:
            starts.append(("inline", argv))
    found = [(where, argv, _started_from(argv)) for where, argv in starts if argv]
    # a JSON snippet that starts something else (None) fails here too
    found = [(where, argv, origin) for where, argv, origin in found if origin or where.startswith("JSON")]
    assert [(where, argv) for where, argv, origin in found if origin not in (dist, *CHECKOUT)] == []
    assert sum(where.startswith("JSON") for where, _, _ in found) == 3
    # both launchers, from a checkout and by the distribution's name once it is published
    assert {(argv[0], origin == dist) for _, argv, origin in found if argv[0] in ("uvx", "pipx")} == {
        ("uvx", True), ("uvx", False), ("pipx", True), ("pipx", False)}


def test_an_sqlite_older_than_the_queries_need_is_refused_in_one_sentence(env, capsys, monkeypatch):
    monkeypatch.setattr(tm.sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(tm.sqlite3, "sqlite_version", "3.31.1")
    code, _, err = cli(capsys, "sync", "--demo")
    assert code == 1
    assert one_line(err) == ("testio-mcp: this Python's SQLite is 3.31.1; testio-mcp needs 3.35.0 or newer: "
                             "use a newer Python build")


def test_readme_never_runs_a_bare_python_which_a_stock_debian_does_not_have():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"`([^`\n]+)`", readme) + [text for lang, text in readme_code_blocks()
                                                     if lang in ("bash", "sh", "")]
    bare = [c for c in commands if re.search(r"(^|[\s($])python(?=\s)", c)]
    assert bare == []


def test_readme_names_no_file_outside_the_repository():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"[\w./-]+\.(?:md|py|sql|toml|txt|cfg)\b|\bLICENSE\b", readme))
    assert names and sorted(name for name in names if not (HERE / name).is_file()) == []


def test_ci_runs_exactly_the_readme_quick_start_and_its_test_command():
    setup, tests = readme_quick_start()
    ci = [line.strip() for line in (HERE / ".ci" / "run").read_text().splitlines()]
    # `|| exit 1`: under `set -e` a failure inside an && chain would not stop the script
    assert ci.index(setup + " || exit 1") < ci.index(tests) == len(ci) - 1
    development = [text.strip() for _, text in readme_code_blocks(readme_section("Development"))]
    assert development[0] == tests  # the Development section's test command is the same


def test_readme_development_maps_the_module_one_line_per_section_banner_in_order():
    lines = (HERE / "testio_mcp.py").read_text().splitlines()
    banners = []  # each banner's title up to its first "(", its lines joined
    for i, line in enumerate(lines[:-1]):
        if line.startswith("#" * 79) and lines[i + 1].startswith("# "):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("#" * 79))
            banners.append(" ".join(text[2:] for text in lines[i + 1:end]).split("(")[0].strip())
    items = re.findall(r"^\d+\. (.*(?:\n {3,}.*)*)", readme_section("Development"), flags=re.M)
    shown = [" ".join(item.replace("`", "").split()) for item in items]
    assert len(shown) == len(banners) and [(b, s) for b, s in zip(banners, shown) if not s.startswith(b)] == []


def _development_commands() -> list[list[str]]:
    """The commands README's Development section runs: its code blocks and inline `.venv/...` spans."""
    section = readme_section("Development")
    lines = [line for _, text in readme_code_blocks(section) for line in text.splitlines() if line.strip()]
    return [shlex.split(c) for c in lines + re.findall(r"`(\.venv/[^`\n]+)`", section)]


def test_readme_development_runs_the_test_command_its_fast_loop_and_bench_runs_the_bench_accepts():
    commands = _development_commands()
    tests = shlex.split(readme_quick_start()[1])
    pytest_runs = [argv for argv in commands if argv[1:3] == ["-m", "pytest"]]
    assert pytest_runs == [tests, [*tests[:4], "-m", "not slow", *tests[4:]]]
    markers = re.search(r"^markers = \[(.*?)\]$", (HERE / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert re.search(r'"slow: ', markers)  # registered: `-m "not slow"` names a marker pytest knows
    bench_runs = [argv for argv in commands if argv[1:2] == ["bench_testio_mcp.py"]]
    assert len(bench_runs) >= 2 and len(pytest_runs) + len(bench_runs) == len(commands)
    import bench_testio_mcp
    for argv in bench_runs:
        assert argv[0] == ".venv/bin/python"
        bench_testio_mcp.build_parser().parse_args(argv[2:])  # exits (fails the test) on an unknown flag


@pytest.mark.slow
def test_the_readme_fast_loop_collects_every_test_but_those_marked_slow():
    fast = next(argv for argv in _development_commands() if "not slow" in argv)
    done = subprocess.run([sys.executable, *fast[1:], "--collect-only", "--strict-markers",
                           "-p", "no:cacheprovider"],
                          cwd=HERE, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    collected = {line.split("::")[1].split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    tree = ast.parse((HERE / "test_testio_mcp.py").read_text())
    tests = {node.name: any("mark.slow" in ast.unparse(d) for d in node.decorator_list)
             for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
             and node.name.startswith("test_")}
    assert collected == {name for name, slow in tests.items() if not slow}
    assert re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", done.stdout)


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_thousand_tool_calls_during_cli_syncs_never_see_a_locked_database_or_half_a_page(
        env, loopback, tmp_path, monkeypatch):
    monkeypatch.setenv("TESTIO_REFRESH_INTERVAL_SECONDS", "0")
    acc = make_account(tests_per_product=450, bugs_per_test=3)
    a, b, _ = acc.product_ids()
    api = loopback(acc.handler)
    assert finish(spawn_sync(tmp_path, api.base_url, "--product-ids", str(a), name="first"), tmp_path,
                  "first")[0] == 0
    archived = next(t for t in acc.test_ids(a) if acc.test_json(t)["status"] == "archived")
    calls = [("list_tests", {"product_id": b, "per_page": 5}), ("get_quality_report", {"product_ids": [a]}),
             ("search", {"query": "login"}), ("list_bugs", {"product_ids": [a], "per_page": 20}),
             ("get_test_status", {"test_id": archived}), ("list_features", {"product_id": a}),
             ("query_metrics", {"metrics": ["bug_count", "rejection_rate"], "dimensions": ["product"]}),
             ("get_database_stats", {})]
    syncs, totals, texts, during = [], set(), [], 0
    seen_counts, stop = set(), threading.Event()

    def count_pages():  # a second reader as fast as it can go, on its own connection
        conn = sqlite3.connect(str(env))
        while not stop.is_set():
            seen_counts.update(conn.execute("SELECT product_id, count(*) FROM tests WHERE product_id != ? "
                                            "GROUP BY product_id", (a,)).fetchall())
        conn.close()

    poller = threading.Thread(target=count_pages, daemon=True)
    async with mcp_client(acc.handler) as client:
        with anyio.fail_after(180):
            syncs.append(spawn_sync(tmp_path, api.base_url, name="sync0"))  # cold for products b and c
            poller.start()
            while not any(p["id"] == b for p in (await ok(client, "list_products"))["products"]):
                assert syncs[0].poll() is None, "the sync ended before it stored the products"
            for n in range(1000):
                if syncs[-1].poll() is not None:  # keep a sync writing for the whole run
                    syncs.append(spawn_sync(tmp_path, api.base_url, "--force", name=f"sync{len(syncs)}"))
                tool, args = calls[n % len(calls)]
                during += syncs[-1].poll() is None
                result = await client.call_tool(tool, args)
                texts.append(result.content[0].text)
                assert result.is_error is False, texts[-1]
                if tool == "list_tests":
                    totals.add(result.structured_content["pagination"]["total"])
    stop.set()
    poller.join(WAIT)
    outcomes = [finish(proc, tmp_path, f"sync{i}") for i, proc in enumerate(syncs)]
    assert [code for code, _, _ in outcomes] == [0] * len(syncs), outcomes
    assert not any("database is locked" in text for text in texts + [err for _, _, err in outcomes])
    # a page of tests is committed in one transaction: a reader sees whole pages, never part of one
    final = len(acc.test_ids(b))
    assert totals <= {*range(0, final, tm.PAGE_SIZE), final}
    assert {n for _, n in seen_counts} <= {*range(0, final, tm.PAGE_SIZE), final}, sorted(seen_counts)
    assert len(seen_counts) >= 4  # the poller did see the cold sync of two products progress
    assert during >= 900, f"only {during} of 1000 calls overlapped a running sync"
    assert_matches_truth(env, acc)
