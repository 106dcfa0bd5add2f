"""Tests for testio_mcp: behaviour through the public surfaces (CLI main(), MCP tools, one stdio
subprocess), with fakes only at the boundaries: the simulated TestIO account behind
httpx.MockTransport (or a loopback server), and a real SQLite file in tmp_path."""

import asyncio
import json
import os
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

import testio_mcp as tm

HERE = Path(__file__).resolve().parent
TOKEN = "tok-CANARY-7f3e9b21c4d8"           # searched for in every output, log and DB file
BASE_URL = "http://testio.invalid/customer/v2"
NOW = datetime(2026, 11, 27, tzinfo=timezone.utc)


###############################################################################
# Fixtures and helpers shared by every section
###############################################################################

@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment: token, fake base URL, DB in tmp, no retry waits, no stray .env files."""
    for name in list(os.environ):
        if name.startswith("TESTIO_") or name in ("MAX_CONCURRENT_API_REQUESTS", "LOG_LEVEL"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TESTIO_CUSTOMER_API_TOKEN", TOKEN)
    monkeypatch.setenv("TESTIO_CUSTOMER_API_BASE_URL", BASE_URL)
    monkeypatch.setenv("TESTIO_DB_PATH", str(tmp_path / "data" / "cache.db"))
    monkeypatch.setenv("TESTIO_RETRY_BASE_SECONDS", "0")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    return tmp_path / "data" / "cache.db"


def make_account(**kw) -> tm.SimulatedAccount:
    """A small deterministic account that answers to the canary token."""
    options = {"seed": 7, "products": 3, "tests_per_product": 120, "now": NOW, "token": TOKEN}
    options.update(kw)
    return tm.SimulatedAccount(**options)


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


def transport_for(handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def cli(capsys, *argv, transport=None):
    """Run main(argv); returns (exit code, stdout, stderr)."""
    code = tm.main(list(argv), transport=transport)
    out, err = capsys.readouterr()
    return code, out, err


def db_rows(db_path, sql, args=()):
    conn = sqlite3.connect(str(db_path))
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def assert_matches_truth(db_path, acc: tm.SimulatedAccount, product_ids=None):
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
    assert db_rows(db_path, "PRAGMA integrity_check")[0][0] == "ok"
