"""Retrieve benchmark: C-GET, WADO-RS, QIDO-RS and WADO-RS metadata, saf against Orthanc.

Both servers run as real processes on loopback in the same run and get the same files:

* ``saf``     - ``saf.cli dicom`` (C-GET) and ``saf.cli api`` (DICOMweb at ``/dicomweb``,
  with a clinician's bearer token from ``POST /auth/token``);
* ``orthanc`` - Orthanc with the DICOMweb plugin (``/dicom-web``), C-GET allowed for the
  calling AE.

Workloads (setup untimed, then only the client's request is timed):

1. ``c-get``: dcmtk ``getscu`` retrieves the 200 x 512x512 CT study (stored with
   ``storescu`` first) into an empty directory;
2. ``wado-rs``: ``GET .../studies/{uid}`` as ``multipart/related; type="application/dicom"``,
   the whole body read;
3. ``qido-*``: study searches over 10,000 one-instance 8x8 studies (ingested in process
   with ``saf.ingest.ingest_part10`` for saf, ``POST /instances`` for Orthanc): by
   PatientID, by a one-month StudyDate range, and unfiltered with ``limit=100``;
4. ``metadata-*``: ``GET .../studies/{uid}/metadata`` of a 1,000-instance study, the first
   request after the server started (cold) and the requests after it (warm).

Run from the repository root::

    python -m bench.retrieve [--repeat N] [--json OUT] [--quick] [--workloads retrieval,index]

See ``bench/README.md`` for the fairness choices.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from bench.ingest import (
    CALLING_AET,
    HOST,
    MB,
    REPO_ROOT,
    START_TIMEOUT_S,
    BenchError,
    OrthancReceiver,
    Process,
    SafReceiver,
    Study,
    Tools,
    Workload,
    console,
    dcmtk_env,
    find_dcmtk,
    first_line,
    free_port,
    generate,
    machine_facts,
    run_benchmark,
    run_checked,
    send_study,
    tail,
    wait_for_count,
)

DICOMWEB_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
CLINIC = "BENCH"
USERNAME = "bench"
PASSWORD = "bench-password-not-secret"
"""The benchmark clinician's password: a throw-away hub in a temp dir."""
DICOM_PART = 'multipart/related; type="application/dicom"'
DICOM_JSON = "application/dicom+json"
HTTP_TIMEOUT_S = 600.0

QIDO_PATIENTS = 2000
"""The 1-instance studies are spread over this many Patient IDs (5 studies each at 10,000)."""
QIDO_DAYS = 1096
"""... and over this many consecutive study dates (three years from QIDO_FIRST_DATE)."""
QIDO_FIRST_DATE = datetime.date(2020, 1, 1)
QIDO_PATIENT = 42
"""The Patient ID searched for: BENCH00042."""
QIDO_RANGE = (datetime.date(2020, 3, 1), datetime.date(2020, 3, 31))
"""The StudyDate range searched for (one month)."""


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``--quick`` shrinks all of them."""

    ct_count: int
    qido_studies: int
    metadata_count: int
    qido_batch: int
    """QIDO requests per timed run (the time per request is reported)."""
    warm_batch: int
    """Warm metadata requests per timed run."""


FULL = Sizes(ct_count=200, qido_studies=10_000, metadata_count=1000, qido_batch=20, warm_batch=5)
QUICK = Sizes(ct_count=20, qido_studies=300, metadata_count=100, qido_batch=5, warm_batch=3)


@dataclass
class Timing:
    """All repetitions of one workload on one server: seconds per ``Row.unit``."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


@dataclass
class Row:
    """One workload: what one timed unit is (a study, a request), saf's and Orthanc's times."""

    name: str
    unit: str
    note: str
    nbytes: int = 0
    """Bytes one unit moves (for MB/s), 0 when not meaningful."""
    saf: Timing = field(default_factory=Timing)
    orthanc: Timing = field(default_factory=Timing)

    def ratio(self) -> dict[str, float] | None:
        if not self.saf.times or not self.orthanc.times:
            return None
        return {
            "median": self.saf.median / self.orthanc.median,
            "min": self.saf.best / self.orthanc.best,
        }

    def summary(self) -> dict[str, Any]:
        servers: dict[str, Any] = {}
        for name, timing in (("saf", self.saf), ("orthanc", self.orthanc)):
            servers[name] = {"times_s": timing.times}
            if timing.times:
                servers[name].update(median_s=timing.median, min_s=timing.best)
                if self.nbytes:
                    servers[name]["mb_per_s"] = self.nbytes / MB / timing.median
        return {"unit": self.unit, "note": self.note, **servers, "saf/orthanc": self.ratio()}


# --------------------------------------------------------------------------- data


def study_uid(study: Study) -> str:
    from pydicom import dcmread

    first = next(p for p in sorted(study.directory.rglob("*")) if p.is_file())
    return str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def qido_date(index: int) -> datetime.date:
    return QIDO_FIRST_DATE + datetime.timedelta(days=index % QIDO_DAYS)


def make_qido_studies(count: int, out_dir: Path) -> Study:
    """``count`` one-instance 8x8 CT studies: the repo generator's one instance, re-identified.

    Generating each with ``generate_study`` would take minutes; only the identifiers,
    Patient ID and study date differ, deterministically, so one template is rewritten.
    """
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    template_dir = out_dir.parent / f"{out_dir.name}-template"
    template = generate(Workload("qido", 1, 8, 8, "1 x 8x8 CT"), template_dir, seed=3)
    ds = dcmread(next(p for p in template.directory.rglob("*") if p.is_file()))
    shutil.rmtree(template_dir)
    out_dir.mkdir(parents=True)
    nbytes = 0
    for i in range(count):
        patient = i % QIDO_PATIENTS
        ds.PatientID = f"BENCH{patient:05d}"
        ds.PatientName = f"BENCH^PATIENT{patient:05d}"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = qido_date(i).strftime("%Y%m%d")
        ds.AccessionNumber = f"Q{i:07d}"
        ds.StudyID = str(i)
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["bench-qido", "study", str(i)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bench-qido", "series", str(i)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench-qido", "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        nbytes += path.stat().st_size
    return Study(out_dir, count, nbytes)


def qido_expected(count: int) -> dict[str, int]:
    """How many studies each QIDO query must find among ``count`` generated ones."""
    first, last = QIDO_RANGE
    return {
        "patient": sum(1 for i in range(count) if i % QIDO_PATIENTS == QIDO_PATIENT),
        "date": sum(1 for i in range(count) if first <= qido_date(i) <= last),
        "limit": min(100, count),
    }


def qido_queries() -> dict[str, str]:
    first, last = QIDO_RANGE
    dates = f"{first:%Y%m%d}-{last:%Y%m%d}"
    return {
        "patient": f"PatientID=BENCH{QIDO_PATIENT:05d}",
        "date": f"StudyDate={dates}",
        "limit": "limit=100",
    }


def files_of(*studies: Study) -> list[Path]:
    return [p for s in studies for p in sorted(s.directory.rglob("*")) if p.is_file()]


# --------------------------------------------------------------------------- HTTP


class Http:
    """One keep-alive HTTP/1.1 connection, like a viewer or a script would hold."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT_S)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def request(
        self, method: str, path: str, accept: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, str, bytes]:
        """Status, Content-Type and the whole body.

        A keep-alive connection the server closed while it sat idle (uvicorn's
        keep-alive timeout is 5 s, and a loaded machine can take longer between two
        workloads) is opened again once, as browsers and HTTP libraries do for a GET.
        """
        for attempt in (1, 2):
            try:
                self.conn.request(
                    method, path, body=body, headers={**self.auth, "Accept": accept, **headers}
                )
                response = self.conn.getresponse()
                return response.status, response.getheader("Content-Type", ""), response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.conn.close()
                if attempt == 2 or method != "GET":
                    raise BenchError(
                        f"{method} {HOST}:{self.conn.port}{path} failed: {exc!r}"
                    ) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise BenchError(f"{method} {HOST}:{self.conn.port}{path} failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    def get(self, path: str, accept: str) -> tuple[int, str, bytes]:
        return self.request("GET", path, accept)

    def close(self) -> None:
        self.conn.close()


def wait_until(condition: Callable[[], bool], process: Process, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        if (code := process.exit_code()) is not None:
            raise BenchError(f"exited ({code}) while waiting for {what}:\n{tail(process.log())}")
        time.sleep(0.1)
    raise BenchError(f"timed out waiting for {what}:\n{tail(process.log())}")


def answers(port: int, path: str) -> bool:
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def multipart_parts(content_type: str, body: bytes) -> int:
    """Number of parts of a multipart body (each delimiter line holds ``--boundary``)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise BenchError(f"no boundary in Content-Type {content_type!r}")
    return body.count(b"--" + match.group(1).encode()) - 1


# --------------------------------------------------------------------------- saf


class SafHub:
    """A fresh saf data dir with clinic BENCH (AE BENCHSCU may store and get) and a clinician;
    its DICOM node and its HTTP app run as separate ``saf.cli`` processes."""

    def __init__(self, tools: Tools, workdir: Path) -> None:
        self.tools = tools
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.api: Process | None = None
        self.http_port = 0
        self.node: SafNode | None = None

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "saf.cli", "--data-dir", str(self.data_dir), *args]

    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        run_checked(self.cli("init"), REPO_ROOT, "saf init")
        run_checked(
            self.cli("clinic", "add", CLINIC, "--aet", CALLING_AET, "--allow", "store,get"),
            REPO_ROOT,
            "saf clinic add",
        )
        argv = self.cli(
            "user", "add", USERNAME, "--role", "clinician", "--clinic", CLINIC, "--password-stdin"
        )
        result = subprocess.run(
            argv, cwd=REPO_ROOT, input=PASSWORD + "\n", capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise BenchError(f"saf user add failed:\n{tail(result.stdout + result.stderr)}")

    def ingest(self, paths: Sequence[Path]) -> float:
        """Ingest ``paths`` in process through the one ingest path; return seconds."""
        from sqlalchemy import select

        from saf.hub import Hub
        from saf.ingest import Sender, ingest_part10
        from saf.models import Clinic
        from saf.settings import Settings

        start = time.perf_counter()
        hub = Hub.open(Settings(data_dir=self.data_dir))
        try:
            with hub.sessions() as session:
                clinic_id = session.scalars(select(Clinic.id).where(Clinic.name == CLINIC)).one()
            sender = Sender(clinic_id, "bench")
            for path in paths:
                ingest_part10(hub, path, sender)
        finally:
            hub.close()
        return time.perf_counter() - start

    def complete(self, study_instance_uid: str) -> float:
        """Run the study-complete step a worker runs once the study is stable (thumbnails,
        metadata rows, case and routing) in process; return seconds."""
        from sqlalchemy import select

        from saf.hub import Hub
        from saf.models import Study
        from saf.pipeline import complete_study
        from saf.routing import default_rules
        from saf.settings import Settings

        start = time.perf_counter()
        hub = Hub.open(Settings(data_dir=self.data_dir))
        try:
            with hub.sessions() as session:
                study_pk = session.scalars(
                    select(Study.id).where(Study.study_instance_uid == study_instance_uid)
                ).one()
            complete_study(hub, study_pk, default_rules())
        finally:
            hub.close()
        return time.perf_counter() - start

    def start_api(self) -> str:
        """Start ``saf api`` on a free port; return a clinician's access token."""
        self.http_port = free_port()
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SAF_HTTP_HOST": HOST,
            # One login per start; the default burst would also do, this keeps reruns safe.
            "SAF_AUTH_RATE_BURST": "1000",
        }
        argv = self.cli("--http-port", str(self.http_port), "api")
        log = self.workdir / f"saf-api-{self.http_port}.log"
        self.api = Process(argv, log, env, REPO_ROOT)
        wait_until(lambda: answers(self.http_port, "/healthz"), self.api, "saf api /healthz")
        form = urllib.parse.urlencode(
            {"grant_type": "password", "username": USERNAME, "password": PASSWORD}
        ).encode()
        conn = Http(self.http_port)
        try:
            status, _, body = conn.request(
                "POST",
                "/auth/token",
                "application/json",
                body=form,
                **{"Content-Type": "application/x-www-form-urlencoded"},
            )
        finally:
            conn.close()
        if status != 200:
            raise BenchError(f"saf /auth/token answered {status}: {body[:200]!r}")
        return str(json.loads(body)["access_token"])

    def stop_api(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None

    def start_node(self) -> SafNode:
        self.node = SafNode(self.tools, self.data_dir)
        self.node.start(self.workdir)
        return self.node

    def stop(self) -> None:
        self.stop_api()
        if self.node is not None:
            self.node.stop()
            self.node = None


class SafNode(SafReceiver):
    """``saf.cli dicom`` on a data dir SafHub prepared (no init, no clinic add)."""

    def __init__(self, tools: Tools, data_dir: Path) -> None:
        super().__init__(tools)
        self.data_dir = data_dir

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        argv = self.cli("--dicom-port", str(self.port), "dicom")
        return argv, {**os.environ, "PYTHONUNBUFFERED": "1"}, REPO_ROOT


# --------------------------------------------------------------------------- orthanc


def find_dicomweb_plugin() -> Path | None:
    for path in DICOMWEB_PLUGIN_PATHS:
        if path.is_file():
            return path
    try:  # another layout: ask dpkg where the package put it
        listing = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
    except OSError:
        return None
    found = [Path(line) for line in listing if re.search(r"libOrthancDicomWeb\.so", line)]
    return next((path for path in found if path.is_file()), None)


class OrthancServer(OrthancReceiver):
    """bench.ingest's Orthanc plus the DICOMweb plugin, C-GET for BENCHSCU, HTTP keep-alive."""

    def __init__(self, tools: Tools) -> None:
        # Orthanc's fsync only slows the untimed setup; nothing timed here writes.
        super().__init__(tools, fsync=False)
        self.plugin = find_dicomweb_plugin()

    def unavailable(self) -> str | None:
        if (why := super().unavailable()) is not None:
            return why
        if self.plugin is None:
            return "Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)"
        return None

    def config(self, workdir: Path) -> dict[str, Any]:
        return {
            **super().config(workdir),
            "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"bench": {"AET": CALLING_AET, "Host": HOST, "Port": 104}},
            "KeepAlive": True,
        }

    def upload(self, paths: Sequence[Path]) -> float:
        """``POST /instances`` every file over one keep-alive connection; return seconds."""
        start = time.perf_counter()
        conn = Http(self.http_port)
        try:
            for path in paths:
                status, _, body = conn.request(
                    "POST",
                    "/instances",
                    "application/json",
                    body=path.read_bytes(),
                    **{"Content-Type": "application/dicom"},
                )
                if status != 200:
                    raise BenchError(
                        f"Orthanc POST /instances {path.name}: {status} {body[:200]!r}"
                    )
        finally:
            conn.close()
        return time.perf_counter() - start


# --------------------------------------------------------------------------- workloads


def get_study(getscu: str, called_aet: str, port: int, uid: str, out: Path) -> float:
    """C-GET one study with ``getscu`` into the empty ``out``; return its wall time."""
    out.mkdir(parents=True)
    argv = [
        getscu,
        "-S",
        "-aet",
        CALLING_AET,
        "-aec",
        called_aet,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={uid}",
        "-od",
        str(out),
        HOST,
        str(port),
    ]
    start = time.perf_counter()
    result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or re.search(r"^E:", output, re.MULTILINE):
        raise BenchError(
            f"getscu from {called_aet} failed (exit {result.returncode}):\n{tail(output)}"
        )
    return elapsed


def rotated(rep: int, names: Sequence[str]) -> list[str]:
    """Alternate who goes first, so drift on the machine hits both."""
    shift = rep % len(names)
    return [*names[shift:], *names[:shift]]


def timed_get(conn: Http, path: str, accept: str, what: str) -> tuple[float, str, bytes]:
    start = time.perf_counter()
    status, content_type, body = conn.get(path, accept)
    elapsed = time.perf_counter() - start
    if status != 200:
        raise BenchError(f"{what} {path} answered {status}: {body[:200]!r}")
    return elapsed, content_type, body


def run_retrieval(
    tools: Tools, getscu: str, orthanc: OrthancServer, sizes: Sizes, repeat: int, scratch: Path
) -> list[Row]:
    """C-GET and WADO-RS of the CT study, both servers up for the whole workload."""
    console.print(f"\ngenerating the CT study: {sizes.ct_count} x 512x512")
    study = generate(Workload("ct", sizes.ct_count, 512, 512, "CT"), scratch / "ct", seed=1)
    uid = study_uid(study)
    cget = Row("c-get", "study", f"getscu, {study.count} x 512x512 CT", study.nbytes)
    wado = Row("wado-rs", "study", "GET /studies/{uid}, multipart", study.nbytes)
    saf = SafHub(tools, scratch / "saf-ct")
    try:
        saf.prepare()
        node = saf.start_node()
        token = saf.start_api()
        orthanc.start(scratch / "orthanc-ct")
        send_study(tools, study, node.called_aet, node.port)
        send_study(tools, study, orthanc.called_aet, orthanc.port)
        wait_for_count(orthanc, study.count)
        wait_for_count(node, study.count)
        targets = {
            "saf": (node.called_aet, node.port, Http(saf.http_port, token), "/dicomweb"),
            "orthanc": (orthanc.called_aet, orthanc.port, Http(orthanc.http_port), "/dicom-web"),
        }
        try:
            for rep in range(-1, repeat):  # rep -1: one untimed warm-up of each
                for name in rotated(max(rep, 0), list(targets)):
                    aet, port, conn, root = targets[name]
                    out = scratch / f"get-{name}-{rep}"
                    seconds = get_study(getscu, aet, port, uid, out)
                    got = sum(1 for p in out.rglob("*") if p.is_file())
                    shutil.rmtree(out)
                    if got != study.count:
                        raise BenchError(f"C-GET from {name} gave {got} files, not {study.count}")
                    wado_s, content_type, body = timed_get(
                        conn, f"{root}/studies/{uid}", DICOM_PART, f"{name} WADO-RS"
                    )
                    if (parts := multipart_parts(content_type, body)) != study.count:
                        raise BenchError(f"WADO-RS from {name} gave {parts} parts")
                    if rep < 0:
                        continue
                    getattr(cget, name).times.append(seconds)
                    getattr(wado, name).times.append(wado_s)
                    console.print(
                        f"  run {rep + 1}/{repeat} {name:8} c-get {seconds:7.3f} s"
                        f"  wado-rs {wado_s:7.3f} s ({len(body) / MB:.1f} MB)"
                    )
        finally:
            for _, _, conn, _ in targets.values():
                conn.close()
    finally:
        saf.stop()
        orthanc.stop()
        shutil.rmtree(study.directory, ignore_errors=True)
    return [cget, wado]


def run_index(
    tools: Tools, orthanc: OrthancServer, sizes: Sizes, repeat: int, scratch: Path
) -> tuple[list[Row], dict[str, float]]:
    """QIDO-RS over many small studies and metadata of a large one, in one index per server."""
    console.print(f"\ngenerating {sizes.qido_studies} one-instance 8x8 studies")
    started = time.perf_counter()
    small = make_qido_studies(sizes.qido_studies, scratch / "qido")
    console.print(f"  {time.perf_counter() - started:.1f} s")
    console.print(f"generating the metadata study: {sizes.metadata_count} x 64x64")
    meta = generate(
        Workload("metadata", sizes.metadata_count, 64, 64, "CT"), scratch / "meta", seed=4
    )
    meta_uid = study_uid(meta)
    paths = files_of(small, meta)
    expected = qido_expected(small.count)
    queries = qido_queries()
    rows = {
        key: Row(
            f"qido-{key}",
            "request",
            f"{queries[key]} ({expected[key]} of {small.count + 1} studies)",
        )
        for key in queries
    }
    cold = Row("metadata-cold", "request", f"{meta.count} instances, first request")
    warm = Row("metadata-warm", "request", f"{meta.count} instances, repeated")
    setup: dict[str, float] = {}
    saf = SafHub(tools, scratch / "saf-index")
    try:
        saf.prepare()
        console.print(f"saf: ingesting {len(paths)} instances in process (untimed setup)")
        setup["saf_ingest_s"] = saf.ingest(paths)
        console.print(f"  {setup['saf_ingest_s']:.1f} s")
        # As in production, the worker completes the study once it is stable: that makes
        # the thumbnails and the instance_metadata rows the metadata answer is read from.
        console.print("saf: completing the metadata study (worker step, untimed setup)")
        setup["saf_complete_s"] = saf.complete(meta_uid)
        console.print(f"  {setup['saf_complete_s']:.1f} s")
        orthanc.start(scratch / "orthanc-index")
        console.print(f"orthanc: POST /instances x {len(paths)} (untimed setup)")
        setup["orthanc_upload_s"] = orthanc.upload(paths)
        console.print(f"  {setup['orthanc_upload_s']:.1f} s")
        wait_for_count(orthanc, len(paths))
        orthanc.stop()
        for rep in range(repeat):
            for name in rotated(rep, ["saf", "orthanc"]):
                # A fresh server process each repetition, so the first metadata request is cold.
                if name == "saf":
                    token = saf.start_api()  # sets saf.http_port: a new port each start
                    conn, root = Http(saf.http_port, token), "/dicomweb"
                else:
                    orthanc.start(scratch / "orthanc-index")
                    conn, root = Http(orthanc.http_port), "/dicom-web"
                try:
                    path = f"{root}/studies/{meta_uid}/metadata"
                    what = f"{name} metadata"
                    first, _, body = timed_get(conn, path, DICOM_JSON, what)
                    if len(json.loads(body)) != meta.count:
                        raise BenchError(f"{what} did not list {meta.count} instances")
                    again = [
                        timed_get(conn, path, DICOM_JSON, what)[0] for _ in range(sizes.warm_batch)
                    ]
                    getattr(cold, name).times.append(first)
                    getattr(warm, name).times.append(statistics.median(again))
                    line = f"  run {rep + 1}/{repeat} {name:8} metadata cold {first:6.3f} s"
                    line += f" warm {statistics.median(again):6.3f} s ({len(body) / MB:.1f} MB)"
                    for key, query in queries.items():
                        # Checked untimed first, which also warms this query's code path.
                        found = len(json.loads(conn.get(f"{root}/studies?{query}", DICOM_JSON)[2]))
                        if found != expected[key]:
                            raise BenchError(
                                f"{name} {query}: {found} studies, not {expected[key]}"
                            )
                        seconds = qido_batch(conn, f"{root}/studies?{query}", sizes.qido_batch)
                        getattr(rows[key], name).times.append(seconds)
                        line += f"  qido-{key} {1000 * seconds:6.1f} ms"
                    console.print(line)
                finally:
                    conn.close()
                    if name == "saf":
                        saf.stop_api()
                    else:
                        orthanc.stop()
    finally:
        saf.stop()
        orthanc.stop()
        shutil.rmtree(small.directory, ignore_errors=True)
        shutil.rmtree(meta.directory, ignore_errors=True)
    return [*rows.values(), cold, warm], setup


def qido_batch(conn: Http, path: str, count: int) -> float:
    """Seconds per request of ``count`` sequential searches (JSON; 204 counts as empty)."""
    start = time.perf_counter()
    for _ in range(count):
        status, _, body = conn.get(path, DICOM_JSON)
        if status not in (200, 204):
            raise BenchError(f"{path} answered {status}: {body[:200]!r}")
    return (time.perf_counter() - start) / count


# --------------------------------------------------------------------------- report


def print_rows(rows: Sequence[Row], repeat: int) -> None:
    units = {r.unit: [x.name for x in rows if x.unit == r.unit] for r in rows}
    per = "; ".join(f"per {unit}: {', '.join(names)}" for unit, names in units.items())
    console.print(
        f"\nmilliseconds ({per}), median/min of {repeat} runs;\n"
        "saf/orth = saf time / Orthanc time (<= 1.0: saf as fast or faster)"
    )
    table = Table(box=box.SIMPLE, pad_edge=False)
    for column in ("workload", "saf", "saf min", "orthanc", "orth min", "saf/orth", "min"):
        table.add_column(column, justify="left" if column == "workload" else "right")
    for row in rows:
        ratio = row.ratio()
        cells = [row.name]
        for timing in (row.saf, row.orthanc):
            cells += (
                [f"{1000 * timing.median:.1f}", f"{1000 * timing.best:.1f}"]
                if timing.times
                else ["-", "-"]
            )
        cells += [f"{ratio['median']:.2f}", f"{ratio['min']:.2f}"] if ratio else ["n/a", ""]
        table.add_row(*cells)
    console.print(table)
    for row in rows:
        rate = ""
        if row.nbytes and row.saf.times and row.orthanc.times:
            saf_rate, orthanc_rate = (row.nbytes / MB / t.median for t in (row.saf, row.orthanc))
            rate = f"; saf {saf_rate:.0f} MB/s, orthanc {orthanc_rate:.0f} MB/s"
        console.print(f"  {row.name}: {row.note}{rate}")


def benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    tools = Tools.discover()
    getscu = find_dcmtk("getscu")
    orthanc = OrthancServer(tools)
    if (why := orthanc.unavailable()) is not None:
        raise BenchError(f"this benchmark compares with Orthanc: {why}")
    facts = machine_facts(tools, [orthanc], {}, scratch)
    facts["client"] = first_line([getscu, "--version"]).strip("$ ")
    facts["saf"] = SafReceiver(tools).version()
    facts["dicomweb plugin"] = str(orthanc.plugin)
    for key, value in facts.items():
        console.print(f"{key:>20}: {value}")
    rows: list[Row] = []
    setup: dict[str, float] = {}
    if "retrieval" in args.workloads:
        rows += run_retrieval(tools, getscu, orthanc, sizes, args.repeat, scratch)
    if "index" in args.workloads:
        index_rows, setup = run_index(tools, orthanc, sizes, args.repeat, scratch)
        rows += index_rows
    print_rows(rows, args.repeat)
    return {
        "machine": facts,
        "sizes": sizes.__dict__,
        "setup": setup,
        "workloads": {row.name: row.summary() for row in rows},
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.retrieve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default: 3)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (20-slice CT, 300 studies, 100-instance metadata)",
    )
    parser.add_argument(
        "--scratch", type=Path, default=None, help="parent of the temp dir (default: system temp)"
    )
    parser.add_argument(
        "--workloads",
        default="retrieval,index",
        help="retrieval (c-get, wado-rs), index (qido-*, metadata-*) or both (the default)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    if not args.workloads or not args.workloads <= {"retrieval", "index"}:
        parser.error("--workloads takes retrieval, index or retrieval,index")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(benchmark, args, prefix="saf-bench-retrieve-", scratch=args.scratch)


if __name__ == "__main__":
    sys.exit(main())
