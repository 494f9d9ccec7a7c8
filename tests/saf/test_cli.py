"""The `saf` command as an operator runs it: a real process, its exit codes and its messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from saf.cli import app

TIMEOUT = 120
"""Seconds any one `saf` process may take."""


def _env(**saf_vars: str) -> dict[str, str]:
    """The test's environment without any SAF_* variable except those given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAF_")}
    # Wide enough that rich neither wraps messages nor truncates table cells.
    env["COLUMNS"] = "200"
    return {**env, **saf_vars}


def _start(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "saf", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(args: Sequence[str], proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)


def saf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one `saf` command."""
    return _finish(args, _start(args, env or _env()))


def saf_all(
    commands: Sequence[Sequence[str]], env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent `saf` commands at the same time (each process costs ~1 s to start)."""
    procs = [(args, _start(args, env or _env())) for args in commands]
    return [_finish(args, proc) for args, proc in procs]


def _words(text: str) -> str:
    return " ".join(text.split())


def _assert_clean_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit code 2, a message that says what is wrong, and no traceback."""
    shown = f"{result.args}: rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    message = _words(result.stderr)
    for text in expected:
        assert text in message, shown


def _command_paths(group: TyperGroup, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, TyperGroup):
            yield from _command_paths(command, (*prefix, name))


def test_every_command_has_help() -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    paths = list(_command_paths(root))
    expected = {"init", "up", "dicom", "api", "send", "export", "stats", "keys", "clinic"}
    assert expected <= {p[0] for p in paths}
    assert {("keys", "list"), ("keys", "rotate"), ("clinic", "add"), ("clinic", "list")} <= set(
        paths
    )

    # The real entry point once; each sub-command's help in-process through the same
    # Typer app (a process per command would cost a second each for the same code path).
    top = saf("--help")
    assert top.returncode == 0, top.stderr
    assert all(name in top.stdout for name in expected), top.stdout
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"saf {' '.join(path)} --help: {result.output}"
        assert "Usage:" in result.output, path


def test_init_clinics_stats_keys_and_errors(tmp_path: Path) -> None:
    data_dir = tmp_path / "site" / "data"
    env = _env(SAF_DATA_DIR=str(data_dir))

    first = saf("init", env=env)

    assert first.returncode == 0, first.stderr
    keyring = data_dir / "keyring.json"
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "spool").stat().st_mode) == 0o700
    keyring_text = keyring.read_text()

    again = saf("init", env=env)
    assert again.returncode == 0, again.stderr
    assert keyring.read_text() == keyring_text, "a second init must not replace the keys"

    added = saf("clinic", "add", "Clinic A", "--aet", "MODALITY_A", env=env)
    assert added.returncode == 0, added.stderr
    assert "Clinic A" in added.stdout and "MODALITY_A" in added.stdout

    listed, bad_aet, stats, unknown_study = saf_all(
        [
            ("clinic", "list"),
            ("clinic", "add", "Clinic B", "--aet", "A" * 17),
            ("stats",),
            ("export", "--study", "1.2.3.4.5", "--out", str(tmp_path / "out")),
        ],
        env=env,
    )

    assert listed.returncode == 0, listed.stderr
    assert "Clinic A" in listed.stdout and "MODALITY_A" in listed.stdout
    _assert_clean_failure(bad_aet, "invalid AE title", "1-16")
    assert stats.returncode == 0, stats.stderr
    counts = json.loads(stats.stdout)
    documented = {"clinics", "patients", "studies", "series", "instances", "bytes"}
    assert documented <= set(counts), counts
    assert counts["clinics"] == 1  # Clinic B was refused, not half-registered
    assert counts["instances"] == 0
    _assert_clean_failure(unknown_study, "no study 1.2.3.4.5")
    assert not (tmp_path / "out").exists()

    rotated = saf("keys", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    listed_keys = saf("keys", "list", env=env)

    assert listed_keys.returncode == 0, listed_keys.stderr
    ring = json.loads(keyring.read_text())
    key_ids = [k["id"] for k in ring["keys"]]
    assert len(key_ids) == 2
    new_key = ring["active"]
    assert new_key == key_ids[1]
    assert f"active key {new_key}" in rotated.stdout
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600, "rotation loosened the key ring's mode"
    rows = {line.split()[1]: line for line in listed_keys.stdout.splitlines() if "k0" in line}
    assert set(rows) == set(key_ids), listed_keys.stdout
    assert "yes" in rows[new_key] and "yes" not in rows[key_ids[0]], listed_keys.stdout


def test_uninitialised_data_dir_says_to_run_init(tmp_path: Path) -> None:
    data_dir = tmp_path / "never-initialised"
    commands = [
        ("stats",),
        ("keys", "rotate"),
        ("clinic", "add", "Clinic A"),
        ("export", "--study", "1.2.3", "--out", str(tmp_path / "out")),
        ("dicom",),
    ]

    results = saf_all(commands, env=_env(SAF_DATA_DIR=str(data_dir), SAF_DICOM_PORT="0"))

    for result in results:
        _assert_clean_failure(result, "saf init")
    assert not data_dir.exists(), "a command that refused to run created the data dir"


def test_s3_backend_without_bucket_is_refused(tmp_path: Path) -> None:
    env = _env(SAF_DATA_DIR=str(tmp_path / "data"), SAF_BLOB_BACKEND="s3")

    results = saf_all([("init",), ("stats",)], env=env)

    for result in results:
        _assert_clean_failure(result, "SAF_S3_BUCKET")


def test_rules_check_and_show(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(
        '[[rule]]\nname = "chest-ct"\nmodality = ["CT"]\nbodypart = ["CHEST"]\n'
        'worklist = "thoracic"\n\n[[rule]]\nname = "default"\nworklist = "general"\n'
    )
    good = tmp_path / "good.toml"
    good.write_text(broken.read_text().replace("bodypart", "body_part"))
    env = _env(SAF_DATA_DIR=str(tmp_path / "data"))

    check_broken, check_good, show, check_missing = saf_all(
        [
            ("rules", "check", "--path", str(broken)),
            ("rules", "check", "--path", str(good)),
            ("rules", "show", "--path", str(good)),
            ("rules", "check", "--path", str(tmp_path / "typo.toml")),
        ],
        env=env,
    )

    assert check_broken.returncode == 1
    message = _words(check_broken.stderr)
    assert 'line 4 (rule "chest-ct"): unknown key "bodypart"' in message, message
    assert "Traceback" not in check_broken.stderr
    assert check_good.returncode == 0 and "2 rule(s), OK" in check_good.stdout
    assert show.returncode == 0, show.stderr
    assert "modality=CT; body_part=CHEST" in show.stdout and "thoracic" in show.stdout
    _assert_clean_failure(check_missing, "no rules file at", "typo.toml")


def test_api_workers_serve_from_several_processes(tmp_path: Path) -> None:
    """`saf api --workers 2`: two uvicorn worker processes, each opening the hub from the
    settings it was started with (here --data-dir and --http-port), serve the same port."""
    import time

    import httpx

    from tests.interop.conftest import free_port

    data = str(tmp_path / "data")
    assert saf("--data-dir", data, "init").returncode == 0
    port = free_port()
    args = ("--data-dir", data, "--http-port", str(port), "api", "--workers", "2")
    proc = _start(args, _env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            assert answer.status_code == 200, answer.text
            break
        else:
            raise AssertionError("saf api --workers 2 did not answer within 60 s")
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        pids = {int(p) for p in children}
        assert len(pids) >= 2, children  # the workers (plus uvicorn's helper processes)
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
