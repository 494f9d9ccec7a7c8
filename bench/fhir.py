"""FHIR benchmark: transaction Bundle ingest, read and search throughput of `saf api`.

For each database (SQLite, PostgreSQL) the script makes a fresh hub (``saf init``, a clinic,
an EHR client with an ES384 key registered in process), starts ``saf api`` (uvicorn) as a
real process on a free loopback port, gets one SMART backend-services token through
``POST /auth/token`` and then, with N concurrent clients (threads, one ``httpx.Client``
each, keep-alive):

a. ``ingest-*``: POST transaction Bundles of 100 Patients, 100 ServiceRequests (each its
   own Patient reference, so each one makes or joins a case) and 100 DocumentReferences
   (inline 1 KiB text attachment: the bytes go through the encrypted ingest path) for
   ``--seconds``; resources/s = resources in 2xx answered bundles / wall time. If
   ``POST /fhir`` does not take a transaction Bundle the row says so and the rest runs;
b. ``read``: ``GET /fhir/Patient/{id}`` over 200 Patients, random order;
c. ``search``: ``GET /fhir/Patient?identifier=<system>|<value>`` (one match each).

Every request must answer 2xx (a failure stops the run: no number is printed for a run
that misbehaved). Client and server share the machine's cores, so the figures include
the client's own CPU time; they are a floor for the server.

``--profile`` also profiles the read path in process (cProfile over the same app and
database, through Starlette's TestClient) and prints where the time goes.

Run from the repository root::

    python -m bench.fhir [--databases sqlite,postgresql] [--seconds 10] [--clients 8]
                         [--profile] [--json OUT]

Targets (issue 5, on this 2-core machine): >= 1,000 resources/s bundle ingest and >= 1,000
read req/s on PostgreSQL. References for scale: HAPI FHIR 2,214 resources/s bundle import
and 3,058 CRUD req/s on 8 vCPU (Health Samurai benchmark, 2026).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from bench.ingest import cpu_model, free_port, mounted_filesystem

console = Console(width=150)
HOST = "127.0.0.1"
FHIR = "application/fhir+json"
POSTGRES_ADMIN_URL = os.environ.get(
    "SAF_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"

TARGETS = {"ingest": 1000.0, "read": 1000.0}
"""Targets on this machine (PostgreSQL): resources/s for ingest, req/s for read."""
HAPI = {"ingest": 2214.0, "read": 3058.0, "search": 3058.0}
"""HAPI FHIR on 8 vCPU (Health Samurai 2026): bundle import res/s, CRUD req/s."""


class BenchError(RuntimeError):
    """The run misbehaved: no figure is reported."""


@dataclass
class Result:
    """One measured part."""

    database: str
    part: str
    unit: str
    value: float | None
    requests: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    note: str = ""


@dataclass
class Server:
    """A `saf api` process on its own data dir and database."""

    data_dir: Path
    database_url: str | None
    workers: int = 2
    """`saf api --workers N`: uvicorn worker processes sharing one port (one Python
    process serves on one core)."""
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.bases[0]

    @property
    def bases(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
        env["SAF_ACCESS_TOKEN_CLIENT_SECONDS"] = "3600"
        env["SAF_FHIR_MAX_BODY_BYTES"] = str(64 << 20)
        if self.database_url:
            env["SAF_DATABASE_URL"] = self.database_url
        return env

    def saf(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "saf", "--data-dir", str(self.data_dir), *args],
            capture_output=True, text=True, env=self.env(), timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"saf {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done.stdout

    def start(self) -> None:
        log = (self.data_dir.parent / "api.log").open("ab")
        self.ports = [free_port()]
        for port in self.ports:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "saf", "--data-dir", str(self.data_dir),
                 "--http-port", str(port), "api", "--workers", str(self.workers)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(),
            ))  # fmt: skip
        for proc, base in zip(self.procs, self.bases, strict=True):
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise BenchError(f"saf api exited with {proc.returncode}: {self.log()}")
                try:
                    if httpx.get(f"{base}/fhir/metadata", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
                if time.monotonic() > deadline:
                    raise BenchError(f"saf api did not answer within 60 s: {self.log()}")

    def log(self) -> str:
        path = self.data_dir.parent / "api.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- set-up


@contextmanager
def postgres_database() -> Iterator[str]:
    """A scratch PostgreSQL database, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"saf_bench_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def register_client(server: Server) -> tuple[str, Any, str]:
    """Register an EHR client (ES384) in process; returns (client_id, private key, kid)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from saf.hub import Hub
    from saf.settings import Settings
    from saf.users import add_client

    key = ec.generate_private_key(ec.SECP384R1())
    kid = f"bench-{secrets.token_hex(4)}"
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "ES384"}
    hub = Hub.open(Settings(data_dir=server.data_dir, database_url=server.database_url))
    try:
        info = add_client(hub, "bench-ehr", "Bench Clinic", {"keys": [jwk]}, ["system/*.cruds"])
    finally:
        hub.close()
    return info.id, key, kid


def token(server: Server, client_id: str, key: Any, kid: str) -> str:
    """A bearer token through the real client_credentials grant."""
    import jwt

    url = f"{server.base}/auth/token"
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": client_id, "sub": client_id, "aud": url, "exp": now + 120, "iat": now,
         "jti": secrets.token_hex(16)},
        key, algorithm="ES384", headers={"kid": kid},
    )  # fmt: skip
    response = httpx.post(
        url,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
            "scope": "system/*.cruds",
        },
    )
    if response.status_code != 200:
        raise BenchError(f"token refused: {response.status_code} {response.text[:300]}")
    return str(response.json()["access_token"])


# --------------------------------------------------------------------------- workloads


def patient(mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": mrn}],
        "name": [{"family": "Bench", "given": ["Pat"]}],
        "gender": "unknown",
        "birthDate": "1970-01-01",
    }


def service_request(subject: str, n: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": "urn:oid:1.3.4.5.6.7", "value": f"SR-{n}"}],
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]},
        "subject": {"reference": subject},
    }


def document_reference(subject: str) -> dict[str, Any]:
    data = secrets.token_bytes(768)
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
        "subject": {"reference": subject},
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "data": base64.b64encode(data).decode(),
                }
            }
        ],
    }


def transaction(kind: str, size: int, patient_ids: Sequence[str]) -> dict[str, Any]:
    """A transaction Bundle of `size` new resources of `kind`."""
    entries = []
    for _ in range(size):
        n = uuid.uuid4().hex
        if kind == "Patient":
            resource = patient(f"B-{n}")
        elif kind == "ServiceRequest":
            resource = service_request(f"Patient/{random.choice(patient_ids)}", n)
        else:
            resource = document_reference(f"Patient/{random.choice(patient_ids)}")
        entries.append({"fullUrl": f"urn:uuid:{n}", "resource": resource,
                        "request": {"method": "POST", "url": kind}})  # fmt: skip
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@dataclass
class Load:
    """What N clients did for a while."""

    requests: int
    units: int
    seconds: float
    latencies: list[float]


def run_load(
    bases: Sequence[str],
    headers: dict[str, str],
    clients: int,
    seconds: float,
    request: Callable[[httpx.Client], int],
) -> Load:
    """`clients` threads each calling `request` (returns units done) until time is up."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    totals = {"requests": 0, "units": 0}
    latencies: list[float] = []
    errors: list[str] = []

    def worker(base: str) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
            mine: list[float] = []
            units = 0
            while time.monotonic() < stop and not errors:
                t0 = time.perf_counter()
                try:
                    units += request(http)
                except BenchError as exc:
                    errors.append(str(exc))
                    break
                mine.append(time.perf_counter() - t0)
            with lock:
                totals["requests"] += len(mine)
                totals["units"] += units
                latencies.extend(mine)

    threads = [
        threading.Thread(target=worker, args=(bases[i % len(bases)],)) for i in range(clients)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError(errors[0])
    return Load(totals["requests"], totals["units"], elapsed, latencies)


def _checked(response: httpx.Response, what: str) -> httpx.Response:
    if not response.is_success:
        raise BenchError(f"{what} answered {response.status_code}: {response.text[:300]}")
    return response


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_database(name: str, database_url: str | None, args: argparse.Namespace,
                   scratch: Path) -> list[Result]:  # fmt: skip
    """Every part against one database."""
    server = Server(scratch / name / "data", database_url, args.workers)
    server.data_dir.parent.mkdir(parents=True)
    server.saf("init")
    server.saf("clinic", "add", "Bench Clinic")
    client_id, key, kid = register_client(server)
    results: list[Result] = []
    server.start()
    try:
        headers = {"Authorization": f"Bearer {token(server, client_id, key, kid)}",
                   "Content-Type": FHIR, "Accept": FHIR}  # fmt: skip
        with httpx.Client(base_url=server.base, headers=headers, timeout=120) as http:
            made = [http.post("/fhir/Patient", json=patient(f"MRN-{i}")) for i in range(200)]
            ids = [_checked(r, "create").json()["id"] for r in made]
        # (a) transaction Bundle ingest
        for kind in ("Patient", "ServiceRequest", "DocumentReference"):
            results.append(ingest(server, headers, kind, ids, args, name))
        analyze(server)
        use_wrk = args.client in ("wrk", "both") and shutil.which("wrk") is not None
        use_httpx = args.client in ("httpx", "both") or not use_wrk

        # (b) read
        def read(http: httpx.Client) -> int:
            _checked(http.get(f"/fhir/Patient/{random.choice(ids)}"), "read")
            return 1

        if use_httpx:
            load = run_load(server.bases, headers, args.clients, args.seconds, read)
            results.append(_rate(name, "read", "req/s", load))
        if use_wrk:
            paths = [f"/fhir/Patient/{i}" for i in ids]
            results.append(run_wrk(server, headers, paths, None, args, name, "read (wrk)"))

        # (c) search
        def search(http: httpx.Client) -> int:
            mrn = f"MRN-{random.randrange(200)}"
            body = _checked(http.get("/fhir/Patient", params={"identifier": f"{SYSTEM}|{mrn}"}),
                            "search").json()  # fmt: skip
            if body.get("total") != 1:
                raise BenchError(f"search for {mrn} found {body.get('total')}, expected 1")
            return 1

        if use_httpx:
            load = run_load(server.bases, headers, args.clients, args.seconds, search)
            results.append(_rate(name, "search", "req/s", load))
        if use_wrk:
            paths = [f"/fhir/Patient?identifier={SYSTEM}%7CMRN-{i}" for i in range(200)]
            results.append(
                run_wrk(server, headers, paths, '"total":1,', args, name, "search (wrk)")
            )
    except BenchError as exc:
        raise BenchError(f"{name}: {exc}\n{server.log()}") from None
    finally:
        server.stop()
    if args.profile:
        profile_reads(server, client_id, key, kid, ids, name)
    return results


def analyze(server: Server) -> None:
    """Planner statistics after loading, as a running hub has them (PostgreSQL's
    autovacuum, SQLite's periodic ``PRAGMA optimize`` in saf.db)."""
    from sqlalchemy import text

    from saf.db import make_engine
    from saf.settings import Settings

    url = Settings(data_dir=server.data_dir, database_url=server.database_url)
    engine = make_engine(url.effective_database_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()


WRK_SCRIPT = """
paths = {PATHS}
expect = {EXPECT}
errors = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) math.randomseed(os.time() + math.random(1000000)) end
function request() return wrk.format("GET", paths[math.random(#paths)]) end
function response(status, headers, body)
  if status ~= 200 or (expect and not string.find(body, expect, 1, true)) then
    errors = errors + 1
  end
end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("errors") end
  io.write(string.format("SAF_ERRORS %d\\n", n))
end
"""
"""Random GETs over `paths`; counts answers that are not 200 or lack `expect`."""


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(server: Server, headers: dict[str, str], paths: list[str], expect: str | None,
            args: argparse.Namespace, name: str, part: str) -> Result:  # fmt: skip
    """`wrk` (C, 2 threads) against the server: it needs far less CPU per request than
    Python clients, so more of the 2 cores go to the server."""
    import re

    script = WRK_SCRIPT.replace("{PATHS}", "{" + ",".join(_lua(p) for p in paths) + "}")
    script = script.replace("{EXPECT}", _lua(expect) if expect else "nil")
    lua = server.data_dir.parent / f"{part.split()[0]}.lua"
    lua.write_text(script)
    argv = ["wrk", "-t2", f"-c{args.connections}", f"-d{max(1, int(args.seconds))}s",
            "--timeout", "60s", "--latency", "-s", str(lua)]  # fmt: skip
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    done = subprocess.run([*argv, server.base], capture_output=True, text=True, timeout=600)
    output = done.stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"SAF_ERRORS (\d+)", output)
    socket = re.search(r"Socket errors: (.*)", output)
    if done.returncode != 0 or errors is None:
        raise BenchError(f"wrk failed: {done.stderr[-500:]} {output[-500:]}")
    if int(errors.group(1)) or bad or socket:
        raise BenchError(f"{part}: {errors.group(1)} bad answers; {output[-800:]}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)

    def ms(label: str) -> float | None:
        found = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if not found:
            return None
        return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]

    assert rate is not None and total is not None, output
    return Result(name, part, "req/s", float(rate.group(1)), int(total.group(1)), ms("50"),
                  None, note=f"wrk -t2 -c{args.connections}; p99 {ms('99')} ms")  # fmt: skip


def _clients(args: argparse.Namespace) -> str:
    httpx_part = f"httpx: {args.clients} reader/searcher threads"
    wrk_part = f"wrk: 2 threads, {args.connections} connections"
    if args.client == "httpx" or shutil.which("wrk") is None:
        return httpx_part + ("" if args.client == "httpx" else " (wrk not installed)")
    return wrk_part if args.client == "wrk" else f"{httpx_part}; {wrk_part}"


def ingest(server: Server, headers: dict[str, str], kind: str, ids: list[str],
           args: argparse.Namespace, name: str) -> Result:  # fmt: skip
    """Transaction Bundles of `kind`, or a row saying why there are none."""
    probe = httpx.post(f"{server.base}/fhir", headers=headers,
                       json=transaction(kind, 1, ids), timeout=60)  # fmt: skip
    if probe.status_code in (404, 405) or (
        probe.status_code >= 400 and "Bundle" not in probe.text and "transaction" not in probe.text
    ):
        return Result(name, f"ingest-{kind}", "res/s", None,
                      note=f"transaction Bundles not available: POST /fhir answered "
                      f"{probe.status_code}")  # fmt: skip
    if not probe.is_success:
        raise BenchError(f"transaction of 1 {kind}: {probe.status_code} {probe.text[:400]}")
    size: int = args.bundle_size

    def post(http: httpx.Client) -> int:
        response = http.post("/fhir", json=transaction(kind, size, ids))
        _checked(response, f"transaction of {size} {kind}")
        answered = response.json().get("entry", [])
        if len(answered) != size or not all(
            str(e.get("response", {}).get("status", "")).startswith("201") for e in answered
        ):
            raise BenchError(f"transaction of {size} {kind}: not every entry 201 Created")
        return size

    load = run_load(server.bases, headers, args.ingest_clients, args.seconds, post)
    return _rate(name, f"ingest-{kind}", "res/s", load)


def _rate(name: str, part: str, unit: str, load: Load) -> Result:
    return Result(
        name,
        part,
        unit,
        load.units / load.seconds if load.seconds else None,
        load.requests,
        _percentile(load.latencies, 0.5),
        _percentile(load.latencies, 0.95),
    )


# --------------------------------------------------------------------------- profile


def profile_reads(server: Server, client_id: str, key: Any, kid: str, ids: list[str],
                  name: str, n: int = 300) -> None:  # fmt: skip
    """Where a read's time goes: each stage of the read path timed alone, in process, on
    the same data dir and database (`n` times each), against the whole request through the
    app (Starlette's TestClient, no network). FastAPI runs sync routes on a worker thread,
    so cProfile in the caller would see none of it; stage timing does."""
    import jwt
    from fastapi.testclient import TestClient

    from saf import audit, fhir_store
    from saf.app import create_app
    from saf.hub import Hub
    from saf.settings import Settings
    from saf.tokens import verify_access_token

    hub = Hub.open(Settings(data_dir=server.data_dir, database_url=server.database_url,
                            access_token_client_seconds=3600))  # fmt: skip
    timings: dict[str, float] = {}

    def timed(label: str, call: Callable[[int], object]) -> None:
        for i in range(20):  # warm
            call(i)
        t0 = time.perf_counter()
        for i in range(n):
            call(i)
        timings[label] = 1000 * (time.perf_counter() - t0) / n

    try:
        with TestClient(create_app(hub), base_url="http://testserver") as client:
            now = int(time.time())
            assertion = jwt.encode(
                {"iss": client_id, "sub": client_id, "aud": "http://testserver/auth/token",
                 "exp": now + 120, "iat": now, "jti": secrets.token_hex(16)},
                key, algorithm="ES384", headers={"kid": kid},
            )  # fmt: skip
            got = client.post("/auth/token", data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion, "scope": "system/*.cruds"})  # fmt: skip
            bearer = str(got.json()["access_token"])
            headers = {"Authorization": f"Bearer {bearer}"}
            principal = verify_access_token(hub, bearer)

            def whole(i: int) -> None:
                response = client.get(f"/fhir/Patient/{ids[i % len(ids)]}", headers=headers)
                if response.status_code != 200:
                    raise BenchError(f"profile read answered {response.status_code}")

            def store(i: int) -> object:
                return fhir_store.read(hub, principal, "Patient", ids[i % len(ids)])

            stored = store(0)

            def record(i: int) -> object:
                return audit.record_access(hub, "read", principal, "Patient", ids[0], owner=stored)  # type: ignore[arg-type]

            def render(i: int) -> object:
                return json.dumps(stored.content).encode()  # type: ignore[attr-defined]

            def baseline(i: int) -> None:
                client.get("/fhir/metadata")

            timed("whole request through the app (no network)", whole)
            timed("baseline: GET /fhir/metadata (no token, no database)", baseline)
            timed("token verify + principal (saf.tokens.verify_access_token)",
                  lambda i: verify_access_token(hub, bearer))  # fmt: skip
            timed("store read + unseal (saf.fhir_store.read)", store)
            timed("audit record, own commit (saf.audit.record_access)", record)
            timed("JSON encode of the resource", render)
    finally:
        hub.close()
    total = timings["whole request through the app (no network)"]
    accounted = sum(v for k, v in timings.items() if not k.startswith(("whole", "baseline")))
    table = Table(title=f"read path ({name}, {n} reads per stage, one thread)", box=box.SIMPLE)
    table.add_column("stage")
    table.add_column("ms/read", justify="right")
    table.add_column("% of request", justify="right")
    for label, ms in timings.items():
        table.add_row(label, f"{ms:.2f}", f"{100 * ms / total:.0f}%")
    rest = max(0.0, total - accounted)
    table.add_row("rest: routing, dependencies, scope check, ASGI, TestClient (compare baseline)",
                  f"{rest:.2f}", f"{100 * rest / total:.0f}%")  # fmt: skip
    console.print(table)


# --------------------------------------------------------------------------- report


def print_results(results: list[Result]) -> None:
    table = Table(title="saf FHIR benchmark", box=box.SIMPLE_HEAVY)
    for col in ("database", "part", "value", "requests", "p50 ms", "p95 ms", "target",
                "HAPI (8 vCPU)", "saf/HAPI", "note"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("database", "part") else "right")
    for r in results:
        key = "ingest" if r.part.startswith("ingest") else r.part.split()[0]
        target = TARGETS.get(key) if r.database == "postgresql" else None
        hapi = HAPI.get(key)
        if r.value is None:
            table.add_row(r.database, r.part, "n/a", "-", "-", "-", "-", "-", "-", r.note)
            continue
        mark = ""
        if target is not None:
            mark = " ok" if r.value >= target else " BELOW"
        table.add_row(
            r.database,
            r.part,
            f"{r.value:,.0f} {r.unit}",
            str(r.requests),
            f"{r.p50_ms:.1f}" if r.p50_ms is not None else "-",
            f"{r.p95_ms:.1f}" if r.p95_ms is not None else "-",
            f"{target:,.0f}{mark}" if target else "-",
            f"{hapi:,.0f}" if hapi else "-",
            f"{r.value / hapi:.2f}" if hapi else "-",
            r.note,
        )
    console.print(table)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fhir", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--seconds", type=float, default=10.0, help="per part (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent readers/searchers")
    parser.add_argument("--ingest-clients", type=int, default=2, help="concurrent bundle posters")
    parser.add_argument("--bundle-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=3,
                        help="saf api --workers N (uvicorn processes; 3: on 2 cores a third"
                             " covers the time each waits on PostgreSQL)")  # fmt: skip
    parser.add_argument("--client", choices=("httpx", "wrk", "both"), default="both",
                        help="load generator for read and search (wrk if installed)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=32,
                        help="wrk connections (2 threads)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="profile the read path")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--scratch", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="saf-bench-fhir-", dir=args.scratch))
    facts = {
        "cpus": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "scratch filesystem": mounted_filesystem(scratch),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "clients": f"{args.clients} readers/searchers, {args.ingest_clients} bundle posters",
        "server": f"saf api --workers {args.workers} (uvicorn)",
        "load generator": _clients(args),
    }
    for key, value in facts.items():
        console.print(f"{key}: {value}", highlight=False)
    results: list[Result] = []
    try:
        for name in [d.strip() for d in args.databases.split(",") if d.strip()]:
            if name == "sqlite":
                results += bench_database(name, None, args, scratch)
            elif name == "postgresql":
                with postgres_database() as url:
                    results += bench_database(name, url, args, scratch)
            else:
                raise BenchError(f"unknown database {name!r} (sqlite, postgresql)")
    except BenchError as exc:
        console.print(f"[red]run invalid: {exc}[/red]")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_results(results)
    if args.json:
        body = {"machine": facts, "results": [r.__dict__ for r in results]}
        args.json.write_text(json.dumps(body, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
