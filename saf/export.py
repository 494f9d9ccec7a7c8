"""Export: decrypt a study's stored objects back to the original Part 10 files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import joinedload

from saf import audit, vault
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Instance, Series, Study


class ExportError(LookupError):
    """The study cannot be exported as asked; the message says why."""


@dataclass(frozen=True)
class ExportedFile:
    """One written file."""

    path: Path
    sop_instance_uid: str
    version: int


def export_study(
    hub: Hub,
    study_instance_uid: str,
    out_dir: Path,
    *,
    who: Principal | audit.Actor,
    clinic_id: str | None = None,
) -> list[ExportedFile]:
    """Write the newest version of every instance of the study to `out_dir`.

    Files go to <out>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm (ids only, no PHI).
    Each file is decrypted to a temp file and renamed only once fully verified.
    The export is audited (`export`), refused and failed ones too.
    """
    try:
        study, written = _export(hub, study_instance_uid, out_dir, clinic_id)
    except ExportError as exc:
        audit.record(hub, "export", who, outcome=audit.MINOR_FAILURE, entity_type="Study",
                     clinic_id=clinic_id, detail=f"refused: {exc}")  # fmt: skip
        raise
    except Exception:
        audit.record(hub, "export", who, outcome=audit.SERIOUS_FAILURE, entity_type="Study",
                     clinic_id=clinic_id, detail="export stopped")  # fmt: skip
        raise
    audit.record(
        hub,
        "export",
        who,
        entity_type="Study",
        entity_id=study.id,
        clinic_id=study.clinic_id,
        patient_pk=study.patient_pk,
        detail=f"instances={len(written)}",
    )
    return written


def _export(
    hub: Hub, study_instance_uid: str, out_dir: Path, clinic_id: str | None
) -> tuple[Study, list[ExportedFile]]:
    with hub.sessions() as session:
        stmt = select(Study).where(Study.study_instance_uid == study_instance_uid)
        if clinic_id:
            stmt = stmt.where(Study.clinic_id == clinic_id)
        studies = list(session.scalars(stmt))
        if not studies:
            raise ExportError(f"no study {study_instance_uid}")
        if len(studies) > 1:
            raise ExportError(
                f"study {study_instance_uid} exists at {len(studies)} clinics: pass --clinic"
            )
        instances = list(
            session.scalars(
                select(Instance)
                .options(joinedload(Instance.blob), joinedload(Instance.series))
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.study_pk == studies[0].id)
                .order_by(Series.series_number, Instance.instance_number, Instance.version)
            )
        )
    newest: dict[str, Instance] = {}
    for inst in instances:
        current = newest.get(inst.sop_instance_uid)
        if current is None or inst.version > current.version:
            newest[inst.sop_instance_uid] = inst
    written = []
    for inst in newest.values():
        path = out_dir / inst.series.series_instance_uid / f"{inst.sop_instance_uid}.dcm"
        vault.write_to(hub, inst.blob, path)
        written.append(ExportedFile(path, inst.sop_instance_uid, inst.version))
    return studies[0], written
