"""`saf audit tail`: the latest audit records in the terminal, and new ones with --follow."""

from __future__ import annotations

import threading
import time

from typer.testing import CliRunner

from saf import audit
from saf.cli import app
from saf.hub import Hub
from saf.identity import Principal


def _args(hub: Hub, *rest: str) -> tuple[list[str], dict[str, str]]:
    env = {"COLUMNS": "250", "SAF_DATABASE_URL": hub.settings.database_url or ""}
    return ["--data-dir", str(hub.settings.data_dir), "audit", "tail", *rest], env


def test_tail_shows_the_latest_records_oldest_first(hub: Hub) -> None:
    who = Principal(kind="user", id="u1", name="dr.who", role="clinician", address="10.0.0.7")
    for i in range(5):
        audit.record(hub, "read", who, entity_type="Case", entity_id=f"case{i}", patient_pk="p9")
    audit.record(hub, "login", audit.Actor("anonymous", None, None, "10.6.6.6"), outcome=4)

    args, env = _args(hub, "-n", "3")
    result = CliRunner().invoke(app, args, env=env)

    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "case" in line or "login" in line]
    assert ["case3" in lines[0], "case4" in lines[1], "login" in lines[2]] == [True] * 3
    assert "case2" not in result.output
    assert "user:dr.who" in lines[0] and "10.0.0.7" in lines[0] and "Patient/p9" in lines[0]
    assert "refused" in lines[2] and "anonymous:-" in lines[2] and "10.6.6.6" in lines[2]


def test_follow_prints_records_as_they_arrive(hub: Hub) -> None:
    audit.record(hub, "read", audit.Actor("user", "u1", "before"), entity_id="old")

    def later() -> None:
        time.sleep(0.3)
        audit.record(hub, "read", audit.Actor("user", "u2", "after"), entity_id="new")

    writer = threading.Thread(target=later)
    writer.start()
    args, env = _args(hub, "--follow", "--interval", "0.1", "--polls", "15")
    result = CliRunner().invoke(app, args, env=env)
    writer.join()

    assert result.exit_code == 0, result.output
    assert result.output.index("user:before") < result.output.index("user:after")
