"""Thumbnail benchmark: saf's sealed study thumbnails against Orthanc's JPEG previews.

The same generated CT study (200 x 512x512 by default) is given to both:

* ``saf``     - ingested in process (untimed), then ``saf.thumbnails.make_study_thumbnails``
  is timed: one 128 px JPEG per instance plus one 256 px series thumbnail, each
  instance decrypted, each thumbnail sealed and indexed;
* ``orthanc`` - sent with ``storescu`` (untimed), then every instance is fetched
  sequentially over one keep-alive HTTP connection with ``Accept: image/jpeg``:
  ``/instances/{id}/rendered?width=128&height=128`` when the server supports it
  (like for like), and ``/instances/{id}/preview`` (full size) for reference.

Each saf repetition uses a fresh data dir; Orthanc is started once.

Then the whole pipeline, as a clinic sees it: ``saf up`` (DICOM node, stable-study
timer, Celery worker on the embedded broker) receives the study from ``storescu``, and
the time from the last C-STORE response to "case on the worklist with every thumbnail"
is printed, with the stable age (the wait that decides the study is complete) taken out.

Run from the repository root::

    python -m bench.thumbnails [--count 200] [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.ingest import (
    HOST,
    BenchError,
    OrthancReceiver,
    SafReceiver,
    Study,
    Tools,
    Workload,
    console,
    cpu_model,
    free_port,
    generate,
    mounted_filesystem,
    run_benchmark,
    send_study,
    wait_for_count,
)

JPEG_SOI = b"\xff\xd8"
THUMB_SIZE = 128


@dataclass
class Timing:
    """All repetitions of one thumbnail path."""

    name: str
    note: str
    count: int
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def summary(self) -> dict[str, Any]:
        return {
            "note": self.note,
            "times_s": self.times,
            "median_s": self.median,
            "min_s": self.best,
            "instances_per_s": self.count / self.median,
            "ms_per_instance": 1000 * self.median / self.count,
        }


# --------------------------------------------------------------------------- saf


def saf_once(study: Study, data_dir: Path) -> float:
    """Ingest ``study`` into a fresh hub at ``data_dir`` (untimed); time its thumbnails."""
    from sqlalchemy import select

    from saf.clinics import add_clinic
    from saf.hub import Hub
    from saf.ingest import Sender, ingest_part10
    from saf.models import Study as StudyRow
    from saf.settings import Settings
    from saf.thumbnails import make_study_thumbnails

    hub = Hub.open(Settings(data_dir=data_dir), create=True)
    try:
        clinic = add_clinic(hub, "BENCH", "BENCHSCU")
        sender = Sender(clinic.id, "bench")
        for path in sorted(p for p in study.directory.rglob("*") if p.is_file()):
            ingest_part10(hub, path, sender)
        with hub.engine.connect() as conn:
            study_ids = conn.scalars(select(StudyRow.id)).all()
        if len(study_ids) != 1:
            raise BenchError(f"saf holds {len(study_ids)} studies, expected 1")
        start = time.perf_counter()
        report = make_study_thumbnails(hub, study_ids[0])
        elapsed = time.perf_counter() - start
    finally:
        hub.close()
    expected = study.count + 1  # one per instance + one series thumbnail
    if report.made != expected or report.placeholders:
        raise BenchError(f"saf made {report} thumbnails, expected {expected} real ones")
    return elapsed


def run_saf(study: Study, repeat: int, scratch: Path) -> Timing:
    timing = Timing("saf", f"{THUMB_SIZE}px sealed +series", study.count)
    for rep in range(repeat):
        data_dir = scratch / f"saf-{rep}"
        try:
            timing.times.append(saf_once(study, data_dir))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        console.print(f"  run {rep + 1}/{repeat} saf {timing.times[-1]:8.3f} s")
    return timing


# --------------------------------------------------------------------------- orthanc


def get(conn: http.client.HTTPConnection, path: str, accept: str) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Accept": accept})
    response = conn.getresponse()
    return response.status, response.read()


def fetch_all(conn: http.client.HTTPConnection, ids: Sequence[str], suffix: str) -> float:
    """Fetch ``/instances/{id}{suffix}`` as JPEG for every id; return seconds."""
    start = time.perf_counter()
    for instance_id in ids:
        status, body = get(conn, f"/instances/{instance_id}{suffix}", "image/jpeg")
        if status != 200 or not body.startswith(JPEG_SOI):
            raise BenchError(f"Orthanc {suffix} answered {status}, {body[:40]!r}")
    return time.perf_counter() - start


def orthanc_paths(conn: http.client.HTTPConnection, probe_id: str) -> list[tuple[str, str, str]]:
    """(name, URL suffix, note) of the Orthanc renderings to time; /rendered if supported."""
    rendered = f"/rendered?width={THUMB_SIZE}&height={THUMB_SIZE}"
    paths = [("orthanc-full", "/preview", "512px /preview")]
    status, body = get(conn, f"/instances/{probe_id}{rendered}", "image/jpeg")
    if status == 200 and body.startswith(JPEG_SOI):
        paths.insert(0, ("orthanc", rendered, f"{THUMB_SIZE}px /rendered"))
    else:
        console.print(f"  Orthanc /rendered?width= unsupported ({status}): /preview only")
    return paths


def run_orthanc(tools: Tools, study: Study, repeat: int, scratch: Path) -> tuple[str, list[Timing]]:
    receiver = OrthancReceiver(tools, fsync=True)
    try:
        receiver.start(scratch / "orthanc")
        version = receiver.version()
        send_study(tools, study, receiver.called_aet, receiver.port)
        wait_for_count(receiver, study.count)
        ids = [str(i) for i in receiver.rest("/instances")]
        conn = http.client.HTTPConnection(HOST, receiver.http_port, timeout=60)
        try:
            paths = orthanc_paths(conn, ids[0])
            timings = [Timing(name, note, len(ids)) for name, _, note in paths]
            suffixes = {name: suffix for name, suffix, _ in paths}
            for rep in range(repeat):
                for timing in timings:
                    timing.times.append(fetch_all(conn, ids, suffixes[timing.name]))
                    line = f"  run {rep + 1}/{repeat} {timing.name} {timing.times[-1]:8.3f} s"
                    console.print(line)
        finally:
            conn.close()
    finally:
        receiver.stop()
    return version, timings


# --------------------------------------------------------------------------- report


# --------------------------------------------------------------------------- pipeline

PIPELINE_STABLE_AGE_S = 1.0
"""Stable age for the pipeline run: a study is complete after this long without instances."""


class SafUpReceiver(SafReceiver):
    """``saf up``: DICOM node, stable-study timer and a Celery worker on the embedded broker."""

    name = "saf-up"

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        _argv, env, cwd = super().command(workdir)
        argv = self.cli("--dicom-port", str(self.port), "--http-port", str(free_port()), "up")
        env = {
            **env,
            "SAF_STABLE_AGE_SECONDS": str(PIPELINE_STABLE_AGE_S),
            "SAF_STABLE_CHECK_INTERVAL": "0.1",
            "SAF_OUTBOX_POLL_INTERVAL": "0.1",
        }
        return argv, env, cwd

    def ready(self) -> bool:
        return self.log_contains("http app listening") and self.log_contains(" ready")


def pipeline_latency(tools: Tools, study: Study, workdir: Path) -> float:
    """Seconds from the last C-STORE response to the routed case with all its thumbnails,
    stable age excluded."""
    from sqlalchemy import func, select

    from saf.cases import worklist
    from saf.hub import Hub
    from saf.models import Thumbnail
    from saf.settings import Settings

    receiver = SafUpReceiver(tools)
    receiver.start(workdir)
    try:
        send_study(tools, study, receiver.called_aet, receiver.port)
        sent = time.perf_counter()
        hub = Hub.open(Settings(data_dir=receiver.data_dir))
        try:
            expected = study.count + 1  # one per instance + the series thumbnail
            deadline = sent + 120
            while time.perf_counter() < deadline:
                with hub.sessions() as session:
                    thumbnails = session.scalar(select(func.count(Thumbnail.id)))
                if thumbnails == expected and worklist(hub, "general"):
                    return time.perf_counter() - sent - PIPELINE_STABLE_AGE_S
                time.sleep(0.01)
        finally:
            hub.close()
        assert receiver.process is not None
        raise BenchError(f"no routed case with thumbnails after 120 s:\n{receiver.process.log()}")
    finally:
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(timings: Sequence[Timing]) -> dict[str, float]:
    table = Table()
    for column in ("receiver", "what", "runs", "median s", "min s", "inst/s", "ms/inst"):
        table.add_column(column, justify="left" if column in ("receiver", "what") else "right")
    for t in timings:
        s = t.summary()
        table.add_row(
            t.name,
            t.note,
            str(len(t.times)),
            f"{t.median:.3f}",
            f"{t.best:.3f}",
            f"{s['instances_per_s']:.0f}",
            f"{s['ms_per_instance']:.2f}",
        )
    console.print(table)
    saf = timings[0]
    ratios = {f"saf/{t.name}": saf.median / t.median for t in timings[1:]}
    for label, value in ratios.items():
        console.print(f"  {label} = {value:.2f}  (<= 1.0: saf as fast or faster)")
    console.print("  note: Orthanc /preview renders full size (512x512), saf 128 px.")
    return ratios


def facts(tools: Tools, scratch: Path) -> dict[str, str]:
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "scratch filesystem": mounted_filesystem(scratch),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "orthanc binary": tools.orthanc or "missing",
    }


def benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    tools = Tools.discover()
    machine = facts(tools, scratch)
    for key, value in machine.items():
        console.print(f"{key:>20}: {value}")
    workload = Workload("ct", args.count, 512, 512, f"{args.count} x 512x512 CT")
    console.print(f"\ngenerating {workload.description}")
    study = generate(workload, scratch / "study", seed=1)
    timings = [run_saf(study, args.repeat, scratch)]
    if tools.orthanc is None:
        console.print("[bold yellow]Orthanc not installed[/]: saf only")
    else:
        version, orthanc = run_orthanc(tools, study, args.repeat, scratch)
        machine["orthanc"] = version
        console.print(f"{'orthanc':>20}: {version}")
        timings += orthanc
    console.print(f"\n{study.count} instances, median/min of {args.repeat} runs")
    ratios = print_table(timings)
    latencies = [
        pipeline_latency(tools, study, scratch / f"saf-up-{rep}") for rep in range(args.repeat)
    ]
    latency = statistics.median(latencies)
    console.print(
        f"  saf up: last C-STORE -> case on worklist with all thumbnails: {latency:.2f} s "
        f"(median of {len(latencies)}, stable age of {PIPELINE_STABLE_AGE_S:.0f} s excluded)"
    )
    return {
        "machine": machine,
        "instances": study.count,
        "results": {t.name: t.summary() for t in timings},
        "ratios": ratios,
        "pipeline_latency_s": latencies,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.thumbnails", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=200, help="instances (default: 200)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default: 3)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.count < 1:
        parser.error("--repeat and --count must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(benchmark, parse_args(argv), prefix="saf-bench-thumbs-")


if __name__ == "__main__":
    sys.exit(main())
