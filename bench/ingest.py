"""DICOM ingest benchmark: one dcmtk ``storescu`` association into three receivers.

The same generated study is sent, over loopback, with the same client to:

* ``saf``      - the full saf path (index + encrypt + store), ``python -m saf.cli dicom``;
* ``storescp`` - dcmtk's storage SCP writing raw files to disk (the floor);
* ``orthanc``  - Orthanc with a generated config (skipped if it is not installed).

Only the wall time of the ``storescu`` command is measured. Each repetition starts
every receiver on a fresh storage directory, waits until it answers C-ECHO, sends
one small warm-up study, then times the real study and checks afterwards that the
receiver holds exactly the expected number of instances.

Run from the repository root::

    python -m bench.ingest [--workloads ct,small] [--repeat N] [--json OUT]

See ``bench/README.md`` for the fairness choices.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

HOST = "127.0.0.1"
CALLING_AET = "BENCHSCU"
REPO_ROOT = Path(__file__).resolve().parents[1]
ORTHANC_DEFAULT_PATH = Path("/usr/sbin/Orthanc")
START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
MB = 1_000_000
# dcmtk honours TCP_NODELAY; without it Nagle's algorithm adds ~40 ms per instance.
NODELAY_ENV = {"TCP_NODELAY": "1"}

console = Console(highlight=False)


class BenchError(RuntimeError):
    """A receiver or the client misbehaved: the run is not valid."""


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A study shape passed to ``samples.generate.generate_study``."""

    name: str
    count: int
    rows: int
    columns: int
    description: str


WORKLOADS: dict[str, Workload] = {
    "ct": Workload("ct", 200, 512, 512, "200 x 512x512 16-bit CT (~100 MB)"),
    "small": Workload("small", 1000, 64, 64, "1000 x 64x64 16-bit CT"),
}
WARMUP = Workload("warmup", 1, 64, 64, "1 x 64x64 CT sent untimed before each run")


@dataclass(frozen=True)
class Study:
    """A generated study on disk: ``storescu`` sends the whole directory."""

    directory: Path
    count: int
    nbytes: int


def generate(workload: Workload, out_dir: Path, seed: int) -> Study:
    """Generate ``workload`` into the empty directory ``out_dir``."""
    from samples.generate import generate_study  # the repo's synthetic, PHI-free generator

    out_dir.mkdir(parents=True)
    paths = [
        Path(p)
        for p in generate_study(
            "ct",
            out_dir,
            count=workload.count,
            rows=workload.rows,
            columns=workload.columns,
            seed=seed,
        )
    ]
    on_disk = sorted(p for p in out_dir.rglob("*") if p.is_file())
    if len(paths) != workload.count or len(on_disk) != workload.count:
        raise BenchError(
            f"generator returned {len(paths)} paths and wrote {len(on_disk)} files "
            f"for {workload.name}; expected {workload.count}"
        )
    return Study(out_dir, len(paths), sum(p.stat().st_size for p in on_disk))


# --------------------------------------------------------------------------- tools


def first_line(argv: Sequence[str]) -> str:
    """First line printed by ``argv`` (stdout or stderr), or ``""`` if it cannot run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def find_dcmtk(name: str) -> str:
    """Path of dcmtk's ``name``; pynetdicom puts same-named apps into the venv's bin."""
    for directory in [*os.get_exec_path(), "/usr/bin", "/usr/local/bin"]:
        candidate = Path(directory) / name
        if (
            candidate.is_file()
            and os.access(candidate, os.X_OK)
            and "$dcmtk:" in first_line([str(candidate), "--version"])
        ):
            return str(candidate)
    raise BenchError(f"dcmtk `{name}` not found on PATH (Debian package `dcmtk`)")


def find_orthanc() -> str | None:
    """Path of the Orthanc server binary, if installed."""
    if ORTHANC_DEFAULT_PATH.is_file():
        return str(ORTHANC_DEFAULT_PATH)
    return shutil.which("Orthanc")


@dataclass(frozen=True)
class Tools:
    """External programs used by the benchmark."""

    storescu: str
    storescp: str
    echoscu: str
    orthanc: str | None

    @classmethod
    def discover(cls) -> Tools:
        return cls(
            find_dcmtk("storescu"), find_dcmtk("storescp"), find_dcmtk("echoscu"), find_orthanc()
        )


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, **NODELAY_ENV}


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def echo(tools: Tools, called_aet: str, port: int) -> bool:
    """True if a C-ECHO from ``CALLING_AET`` to ``called_aet`` succeeds."""
    argv = [tools.echoscu, "-aet", CALLING_AET, "-aec", called_aet, "-to", "5", HOST, str(port)]
    try:
        result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def send_study(tools: Tools, study: Study, called_aet: str, port: int) -> float:
    """Send ``study`` in one association; return the wall time of ``storescu`` in seconds.

    Default proposals (all uncompressed transfer syntaxes, one presentation context
    each) restricted with ``-R`` to the SOP classes/transfer syntaxes of the files,
    so every instance travels exactly as stored: no transcoding on either side.
    """
    argv = [
        tools.storescu,
        "-aet",
        CALLING_AET,
        "-aec",
        called_aet,
        "-R",
        "+sd",
        "+r",
        HOST,
        str(port),
        str(study.directory),
    ]
    start = time.perf_counter()
    result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or re.search(r"^E:", output, re.MULTILINE):
        raise BenchError(
            f"storescu to {called_aet} failed (exit {result.returncode}):\n{tail(output)}"
        )
    return elapsed


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


class Process:
    """A subprocess in its own process group (so Ctrl-C reaches only us), logging to a file."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str], cwd: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it if it has not exited within ``STOP_TIMEOUT_S``."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
        self._signal_group(signal.SIGKILL)  # stray children of the receiver, if any

    def _signal_group(self, sig: signal.Signals) -> None:
        # start_new_session=True: the process group id is the child's pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


def run_checked(argv: Sequence[str], cwd: Path, what: str) -> str:
    """Run a short setup command; return stdout or raise ``BenchError`` with its output."""
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise BenchError(
            f"{what} failed (exit {result.returncode}): {' '.join(argv)}\n"
            f"{tail(result.stdout + result.stderr)}"
        )
    return result.stdout


# --------------------------------------------------------------------------- receivers


class Receiver(ABC):
    """A storage SCP under test: ``start`` on a fresh directory, ``count``, ``stop``."""

    name: str
    called_aet: str

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.port = 0
        self.process: Process | None = None

    def unavailable(self) -> str | None:
        """Why this receiver cannot run here, or ``None`` if it can."""
        return None

    @abstractmethod
    def version(self) -> str:
        """Version string for the machine facts."""

    @abstractmethod
    def command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        """Prepare fresh storage under ``workdir``; return argv, environment and cwd."""

    @abstractmethod
    def count(self) -> int:
        """Number of instances the receiver has stored."""

    def ready(self) -> bool:
        """Receiver-specific readiness on top of a successful C-ECHO."""
        return True

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        argv, env, cwd = self.command(workdir)
        self.process = Process(argv, workdir / f"{self.name}.log", env, cwd)
        self.wait_for(
            lambda: self.ready() and echo(self.tools, self.called_aet, self.port),
            f"{self.name} to answer C-ECHO on port {self.port}",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process is not None and (code := self.process.exit_code()) is not None:
                raise BenchError(
                    f"{self.name} exited ({code}) while waiting for {what}:\n"
                    f"{tail(self.process.log())}"
                )
            time.sleep(0.1)
        log = tail(self.process.log()) if self.process else ""
        raise BenchError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}:\n{log}")

    def log_contains(self, needle: str) -> bool:
        return self.process is not None and needle in self.process.log().lower()


class StorescpReceiver(Receiver):
    """dcmtk ``storescp``: one process, accepts every transfer syntax, raw files to disk."""

    name = "storescp"
    called_aet = "STORESCP"

    def __init__(self, tools: Tools) -> None:
        super().__init__(tools)
        self.store_dir = Path()

    def version(self) -> str:
        return first_line([self.tools.storescp, "--version"]).strip("$ ")

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        self.store_dir = workdir / "store"
        self.store_dir.mkdir(parents=True)
        argv = [
            self.tools.storescp,
            "--single-process",
            "-aet",
            self.called_aet,
            "+xa",
            "-od",
            str(self.store_dir),
            str(self.port),
        ]
        return argv, dcmtk_env(), workdir

    def count(self) -> int:
        return sum(1 for p in self.store_dir.rglob("*") if p.is_file())


class OrthancReceiver(Receiver):
    """Orthanc with a minimal JSON config, no plugins, its default durability settings."""

    name = "orthanc"
    called_aet = "ORTHANC"

    def __init__(self, tools: Tools, fsync: bool) -> None:
        super().__init__(tools)
        self.fsync = fsync
        self.http_port = 0

    def unavailable(self) -> str | None:
        if self.tools.orthanc is None:
            return f"Orthanc not installed ({ORTHANC_DEFAULT_PATH} missing, not on PATH)"
        return None

    def version(self) -> str:
        return first_line([self.tools.orthanc or "Orthanc", "--version"]).rsplit("/", 1)[-1]

    def config(self, workdir: Path) -> dict[str, Any]:
        return {
            "Name": "saf-bench",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": self.called_aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "StorageCompression": False,
            # Orthanc's own default (>= 1.7.4): fsync() every stored file.
            "SyncStorageArea": self.fsync,
        }

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        self.http_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(workdir), indent=2))
        # Orthanc's DICOM layer is dcmtk too: give it the same TCP_NODELAY as storescp.
        return [self.tools.orthanc or "Orthanc", str(config_path)], dcmtk_env(), workdir

    def rest(self, path: str) -> Any:
        url = f"http://{HOST}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def ready(self) -> bool:
        try:
            self.rest("/system")
        except OSError:
            return False
        return True

    def count(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])


class SafReceiver(Receiver):
    """saf's DICOM listener (``saf.cli dicom``) on a freshly initialised data dir."""

    name = "saf"
    called_aet = "SAF"
    clinic = "BENCH"

    def __init__(self, tools: Tools) -> None:
        super().__init__(tools)
        self.data_dir = Path()

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "saf.cli", "--data-dir", str(self.data_dir), *args]

    def unavailable(self) -> str | None:
        result = subprocess.run(
            [sys.executable, "-m", "saf.cli", "--help"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = result.stdout + result.stderr
        if result.returncode != 0:
            return f"`python -m saf.cli --help` failed: {tail(output, 3)}"
        missing = [
            c
            for c in ("init", "clinic", "dicom", "stats")
            if not re.search(rf"^\W*{c}\b", output, re.MULTILINE)
        ]
        if missing:
            return f"saf.cli has no command(s): {', '.join(missing)}"
        return None

    def version(self) -> str:
        try:
            return f"saf {importlib.metadata.version('saf')}"
        except importlib.metadata.PackageNotFoundError:
            return "saf (not installed as a package)"

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        self.data_dir = workdir / "data"
        workdir.mkdir(parents=True, exist_ok=True)
        run_checked(self.cli("init"), REPO_ROOT, "saf init")
        run_checked(
            self.cli("clinic", "add", self.clinic, "--aet", CALLING_AET),
            REPO_ROOT,
            "saf clinic add",
        )
        argv = self.cli("--dicom-port", str(self.port), "dicom")
        return argv, {**os.environ, "PYTHONUNBUFFERED": "1"}, REPO_ROOT

    def ready(self) -> bool:
        return self.log_contains("listening")

    def count(self) -> int:
        output = run_checked(self.cli("stats"), REPO_ROOT, "saf stats")
        try:
            return int(json.loads(output)["instances"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"saf stats did not print JSON with `instances`: {output!r}") from exc


class FloorReceiver(Receiver):
    """saf's DICOM node with ingest switched off (``bench.dimse_floor``): pynetdicom's cost."""

    name = "floor"
    called_aet = "SAF"

    def version(self) -> str:
        return f"pynetdicom {importlib.metadata.version('pynetdicom')}"

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "bench.dimse_floor", str(workdir / "data"), str(self.port)]
        return argv, {**os.environ, "PYTHONUNBUFFERED": "1"}, REPO_ROOT

    def ready(self) -> bool:
        return self.log_contains("listening")

    def count(self) -> int:
        assert self.process is not None
        return sum(1 for line in self.process.log().splitlines() if line == "received")


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """All repetitions of one workload on one receiver."""

    receiver: str
    times: list[float] = field(default_factory=list)
    settle: list[float] = field(default_factory=list)
    skipped: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def wait_for_count(receiver: Receiver, expected: int) -> float:
    """Seconds after ``storescu`` returned until the receiver held ``expected`` instances.

    0.0 means stored when acknowledged; more means the receiver acknowledged before
    storing (so the timing understates its work), which the report flags.
    """
    start = time.monotonic()
    asked = start  # when the successful count was requested: a slow count() is not a lag
    while (got := receiver.count()) != expected:
        if got > expected or time.monotonic() - start > SETTLE_TIMEOUT_S:
            raise BenchError(f"{receiver.name} holds {got} instances, expected {expected}")
        time.sleep(0.1)
        asked = time.monotonic()
    return asked - start


def measure_once(
    receiver: Receiver, study: Study, warmup: Study, workdir: Path
) -> tuple[float, float]:
    """Start ``receiver`` fresh, warm it up, time one send; return (seconds, settle seconds)."""
    try:
        receiver.start(workdir)
        send_study(receiver.tools, warmup, receiver.called_aet, receiver.port)
        wait_for_count(receiver, warmup.count)
        seconds = send_study(receiver.tools, study, receiver.called_aet, receiver.port)
        settle = wait_for_count(receiver, warmup.count + study.count)
    finally:
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return seconds, settle


def run_workload(
    receivers: Sequence[Receiver],
    skipped: dict[str, str],
    study: Study,
    warmup: Study,
    repeat: int,
    scratch: Path,
    label: str,
) -> dict[str, Measurement]:
    """Repetition-major, with the receiver order rotated each time so drift hits all."""
    results = {name: Measurement(name, skipped=why) for name, why in skipped.items()}
    results.update({r.name: Measurement(r.name) for r in receivers})
    for rep in range(repeat):
        shift = rep % len(receivers) if receivers else 0
        for receiver in [*receivers[shift:], *receivers[:shift]]:
            seconds, settle = measure_once(
                receiver, study, warmup, scratch / f"{label}-{receiver.name}-{rep}"
            )
            results[receiver.name].times.append(seconds)
            results[receiver.name].settle.append(settle)
            console.print(
                f"  {label} run {rep + 1}/{repeat} {receiver.name:9} {seconds:8.3f} s"
                + (f"  (stored {settle:.2f} s after ack)" if settle else "")
            )
    return results


# --------------------------------------------------------------------------- reporting


def mounted_filesystem(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (tmpfs makes fsync free)."""
    best, fstype = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return fstype
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and resolved.startswith(parts[1]) and len(parts[1]) > len(best):
            best, fstype = parts[1], parts[2]
    return f"{fstype} ({best})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(
    tools: Tools, receivers: Sequence[Receiver], skipped: dict[str, str], scratch: Path
) -> dict[str, str]:
    facts = {
        "cpus": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "scratch filesystem": mounted_filesystem(scratch),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "client": first_line([tools.storescu, "--version"]).strip("$ "),
    }
    for receiver in receivers:
        if receiver.name not in skipped:
            facts[receiver.name] = receiver.version()
    return facts


def summarise(study: Study, m: Measurement) -> dict[str, Any]:
    if m.skipped is not None or not m.times:
        return {"skipped": m.skipped}
    return {
        "times_s": m.times,
        "median_s": m.median,
        "min_s": m.best,
        "instances_per_s": study.count / m.median,
        "mb_per_s": study.nbytes / MB / m.median,
        "stored_after_ack_s": m.settle,
    }


RATIOS = (("saf", "orthanc"), ("saf", "storescp"), ("floor", "orthanc"), ("saf", "floor"))
"""(a, b) pairs reported as a/b time: <= 1.0 means a is as fast as b or faster."""


def ratios(results: dict[str, Measurement]) -> dict[str, dict[str, float] | None]:
    """Time ratios of the RATIOS pairs that ran, on the median and on the min."""
    out: dict[str, dict[str, float] | None] = {}
    for a, b in RATIOS:
        ours, theirs = results.get(a), results.get(b)
        if ours is None or theirs is None:
            continue
        usable = ours.times and theirs.times
        out[f"{a}/{b}"] = (
            {"median": ours.median / theirs.median, "min": ours.best / theirs.best}
            if usable
            else None
        )
    return out


def print_workload(workload: Workload, study: Study, results: dict[str, Measurement]) -> None:
    console.print(
        f"\n[bold]{workload.name}[/]: {study.count} instances, {study.nbytes / MB:.1f} MB "
        f"sent as stored, median/min of {max(len(m.times) for m in results.values())} runs"
    )
    table = Table()
    for column in ("receiver", "runs", "median s", "min s", "inst/s", "MB/s"):
        table.add_column(column, justify="left" if column == "receiver" else "right")
    for name, m in results.items():
        if m.skipped is not None:
            table.add_row(name, "-", "skipped", "", "", "")
            continue
        s = summarise(study, m)
        table.add_row(
            name,
            str(len(m.times)),
            f"{m.median:.3f}",
            f"{m.best:.3f}",
            f"{s['instances_per_s']:.0f}",
            f"{s['mb_per_s']:.1f}",
        )
    console.print(table)
    for label, value in ratios(results).items():
        text = "n/a" if value is None else f"{value['median']:.2f} (min: {value['min']:.2f})"
        console.print(f"  {label} = {text}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--workloads",
        default="ct,small",
        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: ct,small)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="repetitions per receiver (default: 3)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--receivers",
        default="saf,floor,storescp,orthanc",
        help="comma-separated subset of saf,floor,storescp,orthanc, in this order (default: all)",
    )
    parser.add_argument(
        "--orthanc-fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Orthanc SyncStorageArea (its default: on)",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="parent of the temp dir (default: the system temp dir)",
    )
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.receivers = list(dict.fromkeys(r.strip() for r in args.receivers.split(",") if r.strip()))
    if unknown := [w for w in args.workloads if w not in WORKLOADS]:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    if unknown := [r for r in args.receivers if r not in ("saf", "floor", "storescp", "orthanc")]:
        parser.error(f"unknown receiver(s): {', '.join(unknown)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def build_receivers(names: Sequence[str], tools: Tools, orthanc_fsync: bool) -> list[Receiver]:
    factories: dict[str, Callable[[], Receiver]] = {
        "saf": lambda: SafReceiver(tools),
        "floor": lambda: FloorReceiver(tools),
        "storescp": lambda: StorescpReceiver(tools),
        "orthanc": lambda: OrthancReceiver(tools, orthanc_fsync),
    }
    return [factories[name]() for name in names]


def interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind like Ctrl-C so every receiver is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    tools = Tools.discover()
    candidates = build_receivers(args.receivers, tools, args.orthanc_fsync)
    skipped = {r.name: why for r in candidates if (why := r.unavailable()) is not None}
    receivers = [r for r in candidates if r.name not in skipped]
    facts = machine_facts(tools, candidates, skipped, scratch)
    for key, value in facts.items():
        console.print(f"{key:>20}: {value}")
    for name, why in skipped.items():
        console.print(f"[bold yellow]skipping {name}[/]: {why}")
    warmup = generate(WARMUP, scratch / "study-warmup", seed=2)
    report: dict[str, Any] = {"machine": facts, "skipped": skipped, "workloads": {}}
    for name in args.workloads:
        workload = WORKLOADS[name]
        console.print(f"\ngenerating {name}: {workload.description}")
        study = generate(workload, scratch / f"study-{name}", seed=1)
        results = run_workload(receivers, skipped, study, warmup, args.repeat, scratch, name)
        results = {n: results[n] for n in args.receivers}
        print_workload(workload, study, results)
        report["workloads"][name] = {
            "instances": study.count,
            "bytes": study.nbytes,
            "receivers": {n: summarise(study, m) for n, m in results.items()},
            "ratios": ratios(results),
        }
        shutil.rmtree(study.directory, ignore_errors=True)
    return report


def run_benchmark(
    benchmark: Callable[[argparse.Namespace, Path], dict[str, Any]],
    args: argparse.Namespace,
    *,
    prefix: str,
    scratch: Path | None = None,
) -> int:
    """Run `benchmark` in a temp dir that is always removed; SIGTERM acts like Ctrl-C.

    Returns the exit status: 0, 1 when the run is invalid, 130 when interrupted.
    """
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix, dir=scratch) as tmp:
            report = benchmark(args, Path(tmp))
    except BenchError as exc:
        console.print(f"[bold red]benchmark failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]; every process stopped, temp dir removed")
        return 130
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(benchmark, args, prefix="saf-bench-", scratch=args.scratch)


if __name__ == "__main__":
    sys.exit(main())
