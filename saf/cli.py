"""The `saf` command, and the composition root: the only module that assembles the services.

Service packages (dicom_node, and later fhir_api, viewer, workers) are imported inside
the commands that run them, so `saf` core never depends on them at import time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn, cast

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from saf.blobstore import BlobNotFound
from saf.crypto import CryptoError
from saf.hub import Hub, NotInitialisedError
from saf.settings import Settings

console = Console(stderr=True)
out = Console()

app = typer.Typer(
    help="saf: store-and-forward hub for clinical imaging and records.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Key-encryption keys: list and rotate.", no_args_is_help=True)
clinic_app = typer.Typer(help="Clinics and their DICOM AE titles.", no_args_is_help=True)
rules_app = typer.Typer(help="Routing rules: which worklist a case goes to.", no_args_is_help=True)
user_app = typer.Typer(help="People who log in, and their roles.", no_args_is_help=True)
client_app = typer.Typer(help="EHR systems (SMART Backend Services clients).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(clinic_app, name="clinic")
app.add_typer(rules_app, name="rules")
app.add_typer(user_app, name="user")
app.add_typer(client_app, name="client")
audit_app = typer.Typer(help="The audit trail: who touched what, when.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
forward_app = typer.Typer(help="Forwarding to PACS and archives: queues, retry, rules.",
                          no_args_is_help=True)  # fmt: skip
forward_rules_app = typer.Typer(help="Forwarding rules: which studies go where.",
                                no_args_is_help=True)  # fmt: skip
forward_app.add_typer(forward_rules_app, name="rules")
app.add_typer(forward_app, name="forward")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print what went wrong and what to do, then exit."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.callback()
def main_options(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (index, key ring, blobs) [SAF_DATA_DIR].")
    ] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port [SAF_HTTP_PORT].")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM port [SAF_DICOM_PORT].")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Options here override SAF_* environment variables."""
    overrides: dict[str, Any] = {
        k: v
        for k, v in {"data_dir": data_dir, "http_port": http_port, "dicom_port": dicom_port}.items()
        if v is not None
    }
    ctx.obj = overrides
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("pynetdicom", "botocore", "boto3", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def settings_from(ctx: typer.Context, **extra: Any) -> Settings:
    """Settings from the environment plus command-line overrides; a bad value exits cleanly."""
    try:
        return Settings(**{**(ctx.obj or {}), **extra})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        fail(f"invalid configuration: {problems}")


def open_hub(ctx: typer.Context, *, create: bool = False, **extra: Any) -> Hub:
    """Open the hub's storage, turning set-up problems into messages that say what to fix."""
    settings = settings_from(ctx, **extra)
    try:
        return Hub.open(settings, create=create)
    except NotInitialisedError as exc:
        fail(str(exc))
    except CryptoError as exc:
        fail(f"key ring: {exc}")


@app.command()
def init(ctx: typer.Context) -> None:
    """Create the data directory, key ring (mode 0600) and database schema."""
    hub = open_hub(ctx, create=True)
    out.print(f"data dir   {hub.settings.data_dir.resolve()}")
    out.print(f"key ring   {hub.keyring.path} (active key {hub.keyring.active_key_id})")
    out.print(f"database   {hub.engine.url.render_as_string(hide_password=True)}")
    out.print(f"blobs      {hub.blobs.describe()}")
    from saf.tokens import signing_keys

    token_key = signing_keys(hub).active
    out.print(f"token key  {hub.settings.token_keys_path} (kid {token_key.kid})")


SSLCertOption = Annotated[
    Path | None, typer.Option(help="Serve HTTPS with this certificate chain (PEM).")
]
SSLKeyOption = Annotated[Path | None, typer.Option(help="Private key of --ssl-certfile (PEM).")]


def _check_ssl_files(certfile: Path | None, keyfile: Path | None) -> None:
    if (certfile is None) != (keyfile is None):
        fail("--ssl-certfile and --ssl-keyfile go together: give both, or neither")
    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            fail(f"no such file: {path}")


@app.command()
def up(
    ctx: typer.Context,
    demo: Annotated[
        bool, typer.Option(help="Register a demo clinic (AE DEMO) and load a sample study.")
    ] = False,
    ssl_certfile: SSLCertOption = None,
    ssl_keyfile: SSLKeyOption = None,
) -> None:
    """Run every component on embedded defaults: DICOM node, worker and HTTP app."""
    _check_ssl_files(ssl_certfile, ssl_keyfile)
    hub = open_hub(ctx, create=True, demo=demo)
    if demo:
        from saf.demo import load_demo

        load_demo(hub)
    worker_proc = _start_worker(hub)  # first: no other thread runs yet (see _die_with_parent)
    node, timer = _start_dicom(hub)
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again with the previous
    # handler restored; make that handler an exit, so the clean-up below runs.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_quietly)
    try:
        _serve_http(hub, ssl_certfile, ssl_keyfile)
    finally:
        worker_proc.terminate()
        timer.stop()
        node.stop()
        worker_proc.wait(timeout=30)


def _exit_quietly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


@app.command()
def dicom(ctx: typer.Context) -> None:
    """Run the DICOM node alone (C-ECHO, C-STORE) with the stable-study timer."""
    hub = open_hub(ctx)
    node, timer = _start_dicom(hub)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    timer.stop()
    node.stop()


@app.command()
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks run at once.")] = 2,
) -> None:
    """Run a Celery worker, the outbox dispatcher (thumbnails, cases, routing), the forwarder
    and the FHIR Subscription notifier."""
    from celery.signals import worker_ready

    from saf.outbox import Dispatcher
    from workers import tasks
    from workers.app import QUEUE, make_celery

    hub = open_hub(ctx)
    celery_app = make_celery(hub.settings)
    tasks.configure(hub)
    dispatcher = Dispatcher(
        hub, lambda event_id: tasks.handle_outbox_event.apply_async(args=[event_id], queue=QUEUE)
    )
    forwarder = _make_forwarder(hub)
    notifier = _make_notifier(hub)

    # Publish only once this worker consumes: its queue is declared by then, and a
    # message published to an undeclared queue could be dropped by the broker.
    def _on_ready(**_: Any) -> None:
        dispatcher.start()
        forwarder.start()
        notifier.start()

    worker_ready.connect(_on_ready, weak=False)
    out.print(f"worker on {_broker_label(hub.settings.effective_broker_url)}", highlight=False)
    try:
        celery_app.worker_main(
            ["worker", "--pool=threads", f"--concurrency={concurrency}", "-Q", QUEUE,
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        )  # fmt: skip
    finally:
        dispatcher.stop()
        forwarder.stop()
        notifier.stop()


def _make_forwarder(hub: Hub) -> Any:
    """The forwarding sender loop; fails now if the forwarding rules file is broken."""
    from dicom_node.commitment import make_report_transport
    from dicom_node.forward import make_transport
    from saf.forwarding import Forwarder, rules_in_force
    from saf.routing import RulesError

    try:
        rules_in_force(hub)
    except RulesError as exc:
        fail(str(exc), code=1)
    return Forwarder(
        hub,
        make_transport(hub.settings.ae_title, hub.settings),
        report_transport=make_report_transport(hub.settings.ae_title),
    )


def _make_notifier(hub: Hub) -> Any:
    """The FHIR Subscription delivery loop (saf.subscriptions), with the FHIR package's Task
    rendering: the composition root is the one place that joins the two."""
    from fhir_api.tasks import task_of
    from saf.subscriptions import Notifier

    return Notifier(hub, task_of)


def _broker_label(url: str) -> str:
    """The broker URL without credentials, for messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


@app.command()
def api(
    ctx: typer.Context,
    ssl_certfile: SSLCertOption = None,
    ssl_keyfile: SSLKeyOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="HTTP app processes sharing the port, e.g. one per core [SAF_HTTP_WORKERS]."
        ),
    ] = None,
) -> None:
    """Run the HTTP app alone."""
    _check_ssl_files(ssl_certfile, ssl_keyfile)
    extra: dict[str, Any] = {"http_workers": workers} if workers is not None else {}
    _serve_http(open_hub(ctx, **extra), ssl_certfile, ssl_keyfile)


def _start_worker(hub: Hub) -> subprocess.Popen[bytes]:
    """`saf worker` as a child process (same settings), so `saf up` is one process tree."""
    argv = [sys.executable, "-m", "saf", "--data-dir", str(hub.settings.data_dir), "worker"]
    if sys.platform == "linux":
        return subprocess.Popen(argv, preexec_fn=_die_with_parent)
    return subprocess.Popen(argv)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when `saf up` dies, even by SIGKILL, so no
    orphaned worker keeps running. (preexec_fn: only safe while the parent has one thread.)"""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_dicom(hub: Hub) -> tuple[Any, Any]:
    from dicom_node.scp import DicomNode
    from dicom_node.tls import TLSConfigError
    from saf.stability import StableStudyTimer

    settings = hub.settings
    node = DicomNode(hub)
    try:
        node.start()
    except TLSConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        ports = f"{settings.dicom_port if settings.dicom_plain else ''}" + (
            f" / TLS {settings.dicom_tls_port}" if settings.dicom_tls else ""
        )
        fail(f"cannot listen on DICOM port {ports.strip(' /')}: {exc.strerror or exc}")
    timer = StableStudyTimer(hub)
    timer.start()
    if settings.dicom_plain:
        host, port = node.address
        out.print(f"DICOM node {settings.ae_title} listening on {host}:{port}", highlight=False)
    if settings.dicom_tls:
        host, port = node.tls_address
        mutual = "mutual TLS" if settings.dicom_tls_ca else "TLS"
        out.print(f"DICOM node {settings.ae_title} ({mutual}) on {host}:{port}", highlight=False)
    return node, timer


def _serve_http(
    hub: Hub, ssl_certfile: Path | None = None, ssl_keyfile: Path | None = None
) -> None:
    import uvicorn

    from saf.app import create_app

    settings = hub.settings
    scheme = "https" if ssl_certfile else "http"
    out.print(
        f"HTTP app listening on {scheme}://{settings.http_host}:{settings.http_port} (/healthz)",
        highlight=False,
    )
    certfile = str(ssl_certfile) if ssl_certfile else None
    keyfile = str(ssl_keyfile) if ssl_keyfile else None
    if settings.http_workers == 1:
        uvicorn.run(
            create_app(hub),
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
        return
    # Several processes: uvicorn starts each from an import string, so each worker opens
    # the hub itself from the same settings, handed over as SAF_* variables. (`hub` stays
    # open: under `saf up` the DICOM node in this process uses it.)
    for name, value in settings.model_dump(mode="json", exclude_unset=True).items():
        if value is not None:
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            os.environ[f"SAF_{name.upper()}"] = text
    uvicorn.run(
        "saf.app:app_from_environment",
        factory=True,
        workers=settings.http_workers,
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    to: Annotated[str, typer.Option("--to", help="Destination HOST:PORT.")],
    aet: Annotated[str, typer.Option(help="Our (calling) AE title.")] = "SAFSCU",
    called_aet: Annotated[str, typer.Option(help="Destination (called) AE title.")] = "SAF",
    tls: Annotated[bool, typer.Option("--tls", help="Use DICOM TLS (TLS 1.2+).")] = False,
    ca: Annotated[
        Path | None, typer.Option(help="CA bundle (PEM) to verify the destination [--tls].")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="Our client certificate (PEM), for mutual TLS [--tls].")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="Private key (PEM) of --cert.")] = None,
) -> None:
    """Send files with C-STORE as they are stored (no re-encoding), with progress and a summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from dicom_node.scu import SendItem, SendReport, scan
    from dicom_node.scu import send as c_store
    from dicom_node.tls import TLSConfigError, client_context

    host, _, port_text = to.rpartition(":")
    if not host or not port_text.isdigit():
        fail(f"--to must be HOST:PORT, got {to!r}")
    if not tls and (ca or cert or key):
        fail("--ca, --cert and --key are TLS options: add --tls")
    if (cert is None) != (key is None):
        fail("--cert and --key go together")
    try:
        context = client_context(ca, cert, key) if tls else None
    except TLSConfigError as exc:
        fail(str(exc))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"no such file or folder: {', '.join(missing)}")
    report = SendReport()
    items = scan(paths, report)
    if not items:
        fail("nothing to send: no DICOM Part 10 files found")
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"C-STORE to {called_aet}@{to}", total=len(items))

        def advance(_item: SendItem, _status: int | None) -> None:
            progress.advance(task)

        c_store(
            items,
            host,
            int(port_text),
            calling_aet=aet,
            called_aet=called_aet,
            on_done=advance,
            report=report,
            tls=context,
        )
    table = Table(title="saf send")
    for column in ("sent", "failed", "skipped (not DICOM)"):
        table.add_column(column, justify="right")
    table.add_row(str(len(report.sent)), str(len(report.failed)), str(len(report.skipped)))
    out.print(table)
    for path, reason in report.failed[:20]:
        console.print(f"  failed {path}: {reason}", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def export(
    ctx: typer.Context,
    study: Annotated[str, typer.Option(help="Study Instance UID.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the files into.")],
    clinic: Annotated[
        str | None, typer.Option(help="Clinic name, when the UID exists at several.")
    ] = None,
) -> None:
    """Decrypt a study and write its original Part 10 files (<out>/<series>/<sop>.dcm)."""
    from saf.clinics import find_clinic_id
    from saf.export import ExportError, export_study

    hub = open_hub(ctx)
    clinic_id = None
    if clinic:
        clinic_id = find_clinic_id(hub, clinic)
        if clinic_id is None:
            fail(f"no clinic named {clinic!r} (see `saf clinic list`)")
    try:
        files = export_study(hub, study, out_dir, who=_operator(), clinic_id=clinic_id)
    except ExportError as exc:
        fail(str(exc))
    except (CryptoError, BlobNotFound) as exc:
        fail(f"stored data failed verification, export stopped: {exc}", code=3)
    out.print(f"exported {len(files)} instance(s) to {out_dir}")


def _operator() -> Any:
    """The audit actor for a command run at this machine: the hub, on behalf of an OS user."""
    import getpass

    from saf.audit import Actor

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Actor("system", None, f"cli:{user}"[:64], "local")


@app.command()
def stats(ctx: typer.Context) -> None:
    """Counts as JSON: clinics, patients, studies, series, instances, bytes."""
    from saf.stats import collect

    out.print_json(json.dumps(collect(open_hub(ctx))))


@app.command()
def backfill(ctx: typer.Context) -> None:
    """Make what studies stored before an upgrade lack: each instance's metadata row
    (WADO-RS metadata from the index) and missing thumbnails. Safe to run again, and
    while the hub runs."""
    from saf import instance_metadata
    from saf.thumbnails import make_study_thumbnails

    hub = open_hub(ctx)
    studies = instance_metadata.studies_missing(hub)
    metadata = thumbnails = 0
    for study_pk in studies:
        report = make_study_thumbnails(hub, study_pk)
        metadata += report.metadata
        thumbnails += report.made
    out.print_json(
        json.dumps({"studies": len(studies), "metadata_rows": metadata, "thumbnails": thumbnails})
    )


@app.command("fsck")
def fsck_command(
    ctx: typer.Context,
    deep: Annotated[
        bool, typer.Option(help="Also decrypt and authenticate every blob (reads everything).")
    ] = False,
) -> None:
    """Check index and blob store agree; exit 1 if any indexed blob is missing or corrupt."""
    from saf.fsck import fsck

    report = fsck(open_hub(ctx), deep=deep)
    out.print_json(
        json.dumps(
            {
                "blobs_indexed": report.blobs_indexed,
                "blobs_verified": report.blobs_verified,
                "missing": report.missing,
                "corrupt": [{"blob": b, "reason": r} for b, r in report.corrupt],
                "unindexed": report.unindexed,
            }
        )
    )
    if not report.ok:
        raise typer.Exit(1)


@keys_app.command("list")
def keys_list(ctx: typer.Context) -> None:
    """Key-encryption keys, which is active, and how many blobs each wraps."""
    from saf.keys import blobs_per_key

    hub = open_hub(ctx)
    counts = blobs_per_key(hub)
    table = Table("key id", "created (UTC)", "active", "blobs")
    for key_id in hub.keyring.key_ids:
        table.add_row(
            key_id,
            hub.keyring.created(key_id).strftime("%Y-%m-%d %H:%M:%S"),
            "yes" if key_id == hub.keyring.active_key_id else "",
            str(counts.get(key_id, 0)),
        )
    out.print(table)


@keys_app.command("rotate")
def keys_rotate(ctx: typer.Context) -> None:
    """Add a new KEK and re-wrap every data key under it (content is not re-encrypted)."""
    from saf.keys import rotate

    report = rotate(open_hub(ctx))
    out.print(
        f"active key {report.new_key_id}: re-wrapped {report.blobs_rewrapped} blob(s), "
        f"re-sealed {report.fields_resealed} field(s)",
        highlight=False,
    )


@clinic_app.command("add")
def clinic_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Clinic name.")],
    aet: Annotated[str | None, typer.Option(help="Calling AE title of its modality/PACS.")] = None,
    host: Annotated[str, typer.Option(help="Only accept this AE title from this host.")] = "",
    allow: Annotated[
        str | None,
        typer.Option(
            help="DICOM services the AE may use: store,find,move,get, and reply (the hub "
            "C-STOREs the clinic's consult replies to --host/--port) [new: store]."
        ),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(help="The AE's TLS client certificate (PEM): it must then use mutual TLS."),
    ] = None,
    no_cert: Annotated[
        bool, typer.Option("--no-cert", help="Remove the AE's certificate requirement.")
    ] = False,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port of the AE's own Storage SCP (with --host): a C-MOVE destination [0: remove]."
        ),
    ] = None,
) -> None:
    """Register a clinic and a calling AE title for it; again for an AE title: update it."""
    from saf.clinics import ClinicError, add_clinic, cert_sha256_of_pem

    if cert and no_cert:
        fail("give --cert or --no-cert, not both")
    pin = "" if no_cert else None
    if cert:
        try:
            pin = cert_sha256_of_pem(cert.read_text())
        except (OSError, UnicodeDecodeError, ClinicError) as exc:
            fail(f"--cert {cert}: {exc}")
    try:
        info = add_clinic(
            open_hub(ctx),
            name,
            aet,
            host,
            permissions=allow.split(",") if allow is not None else None,
            cert_sha256=pin,
            port=port,
        )
    except ClinicError as exc:
        fail(str(exc))
    peers = ", ".join(p.describe() for p in info.peers) or "no AE titles"
    out.print(f"clinic {info.name} ({info.id}): {peers}", highlight=False, markup=False)


@clinic_app.command("list")
def clinic_list(ctx: typer.Context) -> None:
    """Clinics and their AE titles."""
    from rich.text import Text

    from saf.clinics import list_clinics

    table = Table("name", "id", "AE titles \\[DICOM services] (TLS certificate)")
    for info in list_clinics(open_hub(ctx)):
        peers = Text("\n".join(p.describe() for p in info.peers))  # Text: "[store]" is no markup
        table.add_row(Text(info.name), info.id, peers)
    out.print(table)


def _read_password(from_stdin: bool) -> str:
    """A new password: first line of stdin when piped (or --password-stdin), else a hidden
    prompt asked twice. Never an argument: it would show in `ps` and shell history."""
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Username.")],
    role: Annotated[str, typer.Option(help="clinician, specialist or admin.")],
    clinic: Annotated[str | None, typer.Option(help="Clinic name (clinicians).")] = None,
    specialty: Annotated[
        list[str] | None,
        typer.Option(help="Worklist a specialist serves (repeat for several)."),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from the first line of stdin.")
    ] = False,
) -> None:
    """Create a login: a clinician of one clinic, a specialist, or an admin."""
    from saf.users import UserError, add_user

    hub = open_hub(ctx)
    password = _read_password(password_stdin)
    try:
        info = add_user(hub, name, password, role, clinic=clinic, specialties=specialty or ())
    except UserError as exc:
        fail(str(exc))
    where = info.clinic or ", ".join(info.specialties) or "no PHI"
    out.print(f"user {info.username} ({info.role}: {where}) id {info.id}", highlight=False)


@user_app.command("disable")
def user_disable(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Username.")]
) -> None:
    """Disable a login: its tokens and sessions stop working at the next request."""
    from saf.users import UserError, disable_user

    try:
        info = disable_user(open_hub(ctx), name)
    except UserError as exc:
        fail(str(exc))
    out.print(f"user {info.username} disabled", highlight=False)


@user_app.command("list")
def user_list(ctx: typer.Context) -> None:
    """Logins, their roles, clinics and specialties."""
    from saf.users import list_users

    table = Table("username", "role", "clinic", "specialties", "disabled (UTC)", "id")
    for info in list_users(open_hub(ctx)):
        disabled = info.disabled_at.strftime("%Y-%m-%d %H:%M") if info.disabled_at else ""
        table.add_row(info.username, info.role, info.clinic or "",
                      ", ".join(info.specialties), disabled, info.id)  # fmt: skip
    out.print(table)


@client_app.command("add")
def client_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name for the EHR system.")],
    clinic: Annotated[str, typer.Option(help="The clinic it belongs to (name).")],
    jwks: Annotated[Path, typer.Option(help="Its public keys: a JWK Set file (RS384/ES384).")],
    scope: Annotated[
        list[str], typer.Option(help="SMART scope it may be granted, e.g. system/*.rs (repeat).")
    ],
) -> None:
    """Register an EHR system (SMART Backend Services); prints its client_id."""
    from saf.users import UserError, add_client

    try:
        key_set = json.loads(jwks.read_text())
    except FileNotFoundError:
        fail(f"no such file: {jwks}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{jwks} is not a readable JSON JWK Set: {exc}")
    try:
        info = add_client(open_hub(ctx), name, clinic, key_set, scope)
    except UserError as exc:
        fail(str(exc))
    console.print(
        f"client {info.name} of {info.clinic}: keys {', '.join(info.key_ids)}; "
        f"scopes {' '.join(info.scopes)}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(info.id, highlight=False)


@client_app.command("revoke")
def client_revoke(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Client name.")]
) -> None:
    """Revoke an EHR system: its token requests and tokens are refused from now on."""
    from saf.users import UserError, revoke_client

    try:
        info = revoke_client(open_hub(ctx), name)
    except UserError as exc:
        fail(str(exc))
    out.print(f"client {info.name} revoked", highlight=False)


@client_app.command("list")
def client_list(ctx: typer.Context) -> None:
    """EHR systems, their clinics, scopes and key ids."""
    from saf.users import list_clients

    table = Table("name", "clinic", "client_id", "scopes", "key ids", "revoked (UTC)")
    for info in list_clients(open_hub(ctx)):
        revoked = info.revoked_at.strftime("%Y-%m-%d %H:%M") if info.revoked_at else ""
        table.add_row(info.name, info.clinic, info.id, " ".join(info.scopes),
                      ", ".join(info.key_ids), revoked)  # fmt: skip
    out.print(table)


def _rules_path(ctx: typer.Context, path: Path | None) -> Path:
    return path or settings_from(ctx).rules_path


def _load_rules_or_fail(path: Path, *, explicit: bool) -> Any:
    from saf.routing import RulesError, default_rules, load_rules

    try:
        return load_rules(path)
    except FileNotFoundError:
        if explicit:
            fail(f"no rules file at {path}")
        console.print(f"no rules file at {path}: the built-in default applies", highlight=False)
        return default_rules()
    except RulesError as exc:
        fail(str(exc), code=1)


@app.command("worklist")
def worklist_command(
    ctx: typer.Context,
    specialty: Annotated[str, typer.Argument(help="Worklist name, as in the routing rules.")],
    limit: Annotated[int, typer.Option(min=1, max=500, help="Rows per page.")] = 50,
    page: Annotated[int, typer.Option(min=1, help="Page number.")] = 1,
) -> None:
    """Open cases of a worklist: most urgent first, then by due time; overdue marked."""
    from saf.cases import worklist
    from saf.models import utcnow

    items = worklist(open_hub(ctx), specialty, limit=limit, offset=(page - 1) * limit)
    now = utcnow()
    table = Table("priority", "due (UTC)", "status", "clinic", "modalities", "assigned", "case",
                  title=f"worklist {specialty} (page {page})")  # fmt: skip
    for item in items:
        due = item.due_at.strftime("%Y-%m-%d %H:%M")
        table.add_row(
            item.priority,
            f"[bold red]{due} OVERDUE[/]" if item.overdue(now) else due,
            item.status,
            item.clinic,
            ",".join(item.modalities),
            item.assigned_to or "",
            item.case_id,
        )
    out.print(table)


@audit_app.command("tail")
def audit_tail(
    ctx: typer.Context,
    lines: Annotated[
        int, typer.Option("-n", "--lines", min=1, max=10_000, help="How many latest records.")
    ] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 1.0,
    polls: Annotated[int | None, typer.Option(hidden=True, help="Stop after N polls.")] = None,
) -> None:
    """The latest audit records (ids and names only, no patient data), oldest first."""
    import time

    from saf.identity import SYSTEM
    from saf.models import AuditRecord
    from saf.tenancy import visible_audit

    hub = open_hub(ctx)
    query = visible_audit(SYSTEM)
    with hub.sessions() as session:
        rows = list(session.scalars(query.order_by(AuditRecord.id.desc()).limit(lines)))[::-1]
    out.print(_audit_table(rows, header=True))
    last = rows[-1].id if rows else 0
    done = 0
    try:
        while follow and (polls is None or done < polls):
            time.sleep(interval)
            done += 1
            with hub.sessions() as session:
                rows = list(
                    session.scalars(
                        query.where(AuditRecord.id > last).order_by(AuditRecord.id).limit(1000)
                    )
                )
            if rows:
                out.print(_audit_table(rows, header=False))
                last = rows[-1].id
    except KeyboardInterrupt:
        pass  # Ctrl-C ends --follow quietly


_AUDIT_OUTCOMES = {
    0: "[green]ok[/]",
    4: "[yellow]refused[/]",
    8: "[red]failed[/]",
    12: "[red]major[/]",
}


def _audit_table(rows: list[Any], *, header: bool) -> Table:
    table = Table(
        "time (UTC)", "event", "outcome", "actor", "address", "entity", show_header=header
    )
    for r in rows:
        entity = "/".join(x for x in (r.entity_type, r.entity_id) if x)
        if r.patient_pk:
            entity += f" Patient/{r.patient_pk}"
        table.add_row(
            r.at.strftime("%Y-%m-%d %H:%M:%S"),
            r.event,
            _AUDIT_OUTCOMES.get(r.outcome, str(r.outcome)),
            f"{r.actor_kind}:{r.actor_name or r.actor_id or '-'}",
            r.source_address or "",
            entity,
        )
    return table


@rules_app.command("show")
def rules_show(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Option(help="Rules file [<data dir>/routing.toml].")] = None,
) -> None:
    """The rules in force, in the order they are tried (first match wins)."""
    from saf.routing import describe

    rules = _load_rules_or_fail(_rules_path(ctx, path), explicit=path is not None)
    table = Table("#", "name", "conditions", "worklist", title=f"routing rules ({rules.source})")
    for row in describe(rules):
        conditions = "; ".join(
            f"{key}={','.join(cast(list[str], values))}"
            for key, values in row.items()
            if key not in {"position", "name", "worklist", "catch_all"} and values
        )
        table.add_row(str(row["position"]), str(row["name"]), conditions or "(any case)",
                      str(row["worklist"]))  # fmt: skip
    out.print(table)


@rules_app.command("check")
def rules_check(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Option(help="Rules file [<data dir>/routing.toml].")] = None,
) -> None:
    """Validate a rules file; exit 1 with the line and reason if it is broken."""
    rules = _load_rules_or_fail(_rules_path(ctx, path), explicit=path is not None)
    out.print(f"{rules.source}: {len(rules.rules)} rule(s), OK", highlight=False)


@forward_app.command("status")
def forward_status(ctx: typer.Context) -> None:
    """Each destination's queue (study forwards and Storage Commitment reports): jobs by
    state, most attempts, next attempt, last error."""
    from saf.forwarding import status

    rows = status(open_hub(ctx))
    table = Table("destination", "kind", "pending", "sending", "done", "failed", "attempts",
                  "next attempt (UTC)", "last error", title="forwarding")  # fmt: skip
    for r in rows:
        next_at = r.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if r.next_attempt_at else ""
        table.add_row(r.destination, r.kind, str(r.pending), str(r.sending), str(r.done),
                      f"[red]{r.failed}[/]" if r.failed else "0", str(r.attempts), next_at,
                      r.last_error or "")  # fmt: skip
    if not rows:
        out.print("no forwarding jobs")
        return
    out.print(table)


@forward_app.command("retry")
def forward_retry(
    ctx: typer.Context,
    destination: Annotated[
        str | None, typer.Option(help="Only this destination (as in `saf forward status`).")
    ] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Only jobs that gave up.")] = False,
) -> None:
    """Make waiting jobs due now; failed ones start a fresh retry window."""
    from saf.forwarding import retry

    count = retry(open_hub(ctx), destination=destination, failed_only=failed)
    out.print(f"{count} job(s) due now", highlight=False)


def _forward_rules_or_fail(ctx: typer.Context, path: Path | None) -> Any:
    from saf.forwarding import load_forward_rules
    from saf.routing import RulesError

    path = path or settings_from(ctx).forwarding_path
    try:
        return load_forward_rules(path)
    except RulesError as exc:
        fail(str(exc), code=1)


@forward_rules_app.command("show")
def forward_rules_show(
    ctx: typer.Context,
    path: Annotated[
        Path | None, typer.Option(help="Rules file [<data dir>/forwarding.toml].")
    ] = None,
) -> None:
    """The forwarding rules in force; every matching rule applies (not just the first)."""
    rules = _forward_rules_or_fail(ctx, path)
    table = Table("#", "name", "events", "clinic", "modality", "destination",
                  title=f"forwarding rules ({rules.source})")  # fmt: skip
    for n, rule in enumerate(rules.rules, start=1):
        table.add_row(str(n), rule.name, ",".join(sorted(rule.events)),
                      ",".join(sorted(rule.clinic or ())) or "(any)",
                      ",".join(sorted(rule.modality or ())) or "(any)",
                      rule.destination.url)  # fmt: skip
    out.print(table)


@forward_rules_app.command("check")
def forward_rules_check(
    ctx: typer.Context,
    path: Annotated[
        Path | None, typer.Option(help="Rules file [<data dir>/forwarding.toml].")
    ] = None,
) -> None:
    """Validate the forwarding rules; exit 1 with the line and reason if broken."""
    rules = _forward_rules_or_fail(ctx, path)
    out.print(f"{rules.source}: {len(rules.rules)} rule(s), OK", highlight=False)


def main() -> None:
    """Entry point of the `saf` console script."""
    # Everything saf writes (index, spool, exports) holds PHI: private by default.
    os.umask(0o077)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
