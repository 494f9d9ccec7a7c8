"""Where a transaction Bundle's time goes: bench.fhir's ingest workloads, in process.

Same set-up as bench.fhir (a fresh hub, a clinic, an EHR client with system/*.cruds, 200
Patients) on a scratch PostgreSQL (or SQLite) database, then `--bundles` transaction
Bundles of `--size` entries of each kind (bench.fhir.transaction: Patient,
ServiceRequest, DocumentReference) through fhir_api.bundles.process_bundle in this thread
(a real Starlette Request over the real app, no network; the entries are written in this
thread rather than on the worker thread the app uses), so cProfile sees the whole of it.
Prints, per kind, CPU seconds (the whole process, PostgreSQL's work not included) and
wall seconds per 100 resources, and (``--top N``) the top of the profile (``--sort``).
cProfile slows Python down: compare runs of this script with each other, not with
bench.fhir.

Run from the repository root::

    python -m bench.fhir_bundle_profile [--databases postgresql] [--bundles 10] [--top 25]
                                        [--sort tottime] [--kinds ServiceRequest]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.fhir import Server, patient, postgres_database, register_client, transaction


def _request(app: Any, body: bytes, bearer: str) -> Any:
    from starlette.requests import Request

    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [
        (b"content-type", b"application/fhir+json"),
        (b"accept", b"application/fhir+json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", f"Bearer {bearer}".encode()),
    ]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/fhir",
        "raw_path": b"/fhir",
        "query_string": b"",
        "headers": headers,
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
        "app": app,
        "http_version": "1.1",
        "root_path": "",
    }
    return Request(scope, receive)


def profile_database(name: str, url: str | None, args: argparse.Namespace, scratch: Path) -> None:
    """Set up like bench.fhir, then time and profile each kind's bundles in process."""
    import jwt
    from fastapi.testclient import TestClient

    from fhir_api import bundles
    from fhir_api.bundles import process_bundle
    from saf import fhir_store
    from saf.app import create_app
    from saf.hub import Hub
    from saf.routing import RulesHolder
    from saf.settings import Settings
    from saf.tokens import verify_access_token

    server = Server(scratch / name / "data", url)
    server.data_dir.parent.mkdir(parents=True)
    server.saf("init")
    server.saf("clinic", "add", "Bench Clinic")
    client_id, key, kid = register_client(server)
    hub = Hub.open(
        Settings(data_dir=server.data_dir, database_url=url, access_token_client_seconds=3600)
    )
    try:
        app = create_app(hub)
        with TestClient(app, base_url="http://testserver") as client:
            now = int(time.time())
            assertion = jwt.encode(
                {"iss": client_id, "sub": client_id, "aud": "http://testserver/auth/token",
                 "exp": now + 120, "iat": now, "jti": f"p{now}"},
                key, algorithm="ES384", headers={"kid": kid},
            )  # fmt: skip
            got = client.post("/auth/token", data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion, "scope": "system/*.cruds"})  # fmt: skip
            if got.status_code != 200:
                raise RuntimeError(f"token refused: {got.text}")
            bearer = str(got.json()["access_token"])
        principal = verify_access_token(hub, bearer)
        rules = RulesHolder(hub.settings.rules_path).current
        ids = [fhir_store.create(hub, principal, patient(f"MRN-{i}"), rules).id for i in range(200)]

        async def inline(call: Callable[..., Any], *args: Any) -> Any:
            return call(*args)

        # process_bundle writes on a worker thread; here in this one, where cProfile is.
        bundles.run_in_threadpool = inline  # type: ignore[assignment]

        async def one(bundle: dict[str, Any]) -> None:
            response = await process_bundle(
                _request(app, json.dumps(bundle).encode(), bearer), principal, hub
            )
            if response.status_code != 200:
                raise RuntimeError(f"bundle answered {response.status_code}: {response.body!r}")

        for kind in args.kinds.split(","):
            bundles = [transaction(kind, args.size, ids) for _ in range(args.bundles + 1)]
            asyncio.run(one(bundles[0]))  # warm
            profiler = cProfile.Profile()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            profiler.enable()
            for bundle in bundles[1:]:
                asyncio.run(one(bundle))
            profiler.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            n = args.bundles * args.size
            print(
                f"{name} {kind}: {n} resources, cpu {cpu:.2f} s, wall {wall:.2f} s; "
                f"per 100: cpu {100 * cpu / n * 1000:.0f} ms, wall {100 * wall / n * 1000:.0f} ms; "
                f"{n / wall:.0f} res/s one client, {n / cpu:.0f} res/s per core of this process"
            )
            if args.top:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
                print(out.getvalue())
    finally:
        hub.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--databases", default="postgresql")
    parser.add_argument("--bundles", type=int, default=10, help="bundles per kind")
    parser.add_argument("--size", type=int, default=100, help="entries per bundle")
    parser.add_argument("--top", type=int, default=0, help="print the top N of the profile")
    parser.add_argument("--sort", default="cumulative", help="pstats sort key (tottime...)")
    parser.add_argument("--kinds", default="Patient,ServiceRequest,DocumentReference")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="saf-bundle-profile-") as tmp, ExitStack() as stack:
        for name in args.databases.split(","):
            url = stack.enter_context(postgres_database()) if name == "postgresql" else None
            profile_database(name, url, args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
