"""De-identification of outgoing instances per forwarding destination (DICOM PS3.15 Annex E).

What a destination with ``deidentify = true`` receives, and why:

- **Basic Application Level Confidentiality Profile** (113100) through ``dicognito``, a
  maintained, typed library that walks every element, sequences and File Meta included:
  every UID except class and transfer syntax UIDs is replaced, every PN (patient, staff,
  SR observers) and the patient/order/accession IDs are replaced by made-up values, address
  and equipment identity are replaced. ``deid`` (pydicom/deid) was considered: it is a
  recipe engine whose default recipe needs per-site tuning and has no typed API; dicognito
  fits a "same answer for the same input" remapping directly.
- **Deterministic and keyed.** dicognito derives every replacement from ``seed + original``;
  the seed is HMAC-SHA256(hub secret, destination URL), the secret being 32 random bytes
  in ``<data dir>/deidentify.key`` (created on first use, mode 0600). So within a study and
  across retries and resends the same original gives the same replacement (two instances
  of one study share the remapped Study Instance UID; a resent instance replaces, not
  duplicates), different destinations cannot link their copies, and nobody without the key
  can recompute a remapped UID from a raw one.
- **Dates**: shifted, not removed: one offset per destination (62 to 730 days back, from
  the seed), applied to every DA/DT/TM, birth date included, so intervals and the patient's
  age stay right: *Retain Longitudinal Temporal Information with Modified Dates Option*
  (113107).
- **Patient characteristics** (sex, age, size, weight) are kept, because a specialist
  reading the images needs them: *Retain Patient Characteristics Option* (113108).
- **Removed** (the profile's X actions): private elements, free-text descriptions and
  comments (study/series/procedure descriptions, patient comments and history, image
  comments), other patient names and IDs, physicians and operators, original/modified
  attribute sequences, request attribute sequences.
- **SR content** (a reply's report) keeps its content tree: names, IDs, UIDs and dates in it
  are remapped like everywhere else; the text the specialist wrote is the report itself.
- An instance that says it has burned-in annotation (BurnedInAnnotation YES) is refused:
  the Basic Profile cannot clean pixels, so it is not sent rather than sent identified.
- (0012,0062) PatientIdentityRemoved = YES; (0012,0063) DeidentificationMethod names saf
  and the profile; (0012,0064) DeidentificationMethodCodeSequence lists the CID 7050 codes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from dicognito.anonymizer import Anonymizer
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

KEY_FILENAME: Final = "deidentify.key"
"""The hub's de-identification secret, inside the data directory."""

METHOD: Final = "saf: PS3.15 Basic Profile, options 113107 113108 (dicognito)"
"""The DeidentificationMethod (0012,0063) written into every de-identified instance."""

METHOD_CODES: Final = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)
"""CID 7050 codes for (0012,0064) DeidentificationMethodCodeSequence."""

REMOVED: Final = frozenset(
    {
        "AcquisitionComments",
        "AdditionalPatientHistory",
        "AdmittingDiagnosesCodeSequence",
        "AdmittingDiagnosesDescription",
        "Allergies",
        "BranchOfService",
        "ContentCreatorName",
        "CountryOfResidence",
        "DerivationDescription",
        "EthnicGroup",
        "FrameComments",
        "IdentifyingComments",
        "ImageComments",
        "InstitutionalDepartmentName",
        "IssuerOfPatientID",
        "MedicalAlerts",
        "MedicalRecordLocator",
        "MilitaryRank",
        "ModifiedAttributesSequence",
        "NameOfPhysiciansReadingStudy",
        "Occupation",
        "OperatorsName",
        "OriginalAttributesSequence",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientAddress",
        "PatientBirthName",
        "PatientBirthTime",
        "PatientComments",
        "PatientInsurancePlanCodeSequence",
        "PatientMotherBirthName",
        "PatientReligiousPreference",
        "PatientState",
        "PatientTelecomInformation",
        "PatientTelephoneNumbers",
        "PerformedProcedureStepDescription",
        "PerformingPhysicianName",
        "PersonAddress",
        "PersonTelephoneNumbers",
        "PhysiciansOfRecord",
        "PregnancyStatus",
        "ReasonForStudy",
        "ReferencedPatientSequence",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "RequestAttributesSequence",
        "RequestedProcedureDescription",
        "RequestingPhysician",
        "ScheduledProcedureStepDescription",
        "SeriesDescription",
        "SmokingStatus",
        "SpecialNeeds",
        "StudyComments",
        "StudyDescription",
    }
)
"""Attributes the Basic Profile removes (X) that dicognito would keep or only rewrite."""


class DeidentifyError(ValueError):
    """An instance that cannot be sent de-identified; the message names the SOP Instance UID."""


def hub_secret(data_dir: Path) -> bytes:
    """The hub's de-identification secret (created once, atomically, readable by saf only)."""
    path = data_dir / KEY_FILENAME
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{KEY_FILENAME}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        key = path.read_bytes()
    if len(key) != 32:
        raise DeidentifyError(f"{path} is damaged ({len(key)} bytes, expected 32); restore it")
    return key


def destination_seed(secret: bytes, destination: str) -> str:
    """The per-destination seed: HMAC-SHA256 of the destination URL under the hub secret."""
    return hmac.new(secret, b"saf-deidentify\0" + destination.encode(), hashlib.sha256).hexdigest()


class Deidentifier:
    """De-identifies datasets for one destination; the same seed gives the same output."""

    def __init__(self, seed: str) -> None:
        self._seed = seed

    def __call__(self, ds: Dataset) -> None:
        """De-identify `ds` in place (File Meta too); raises DeidentifyError if it cannot."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentifyError(
                f"instance {ds.get('SOPInstanceUID', '?')} has burned-in annotation "
                "(BurnedInAnnotation YES): not sent to a de-identified destination"
            )
        ds.remove_private_tags()
        _remove(ds)
        # A fresh Anonymizer per dataset: its state is only the seed, so nothing leaks
        # from one instance to the next while the mapping stays the same.
        Anonymizer(seed=self._seed).anonymize(ds)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        codes = []
        for value, meaning in METHOD_CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(codes)

    def file(self, src: Path, dst: Path) -> str:
        """De-identify Part 10 file `src` into `dst` (same transfer syntax); returns the SOP
        Instance UID the destination will see."""
        ds = dcmread(src)
        self(ds)
        ds.save_as(dst, enforce_file_format=True)
        return str(ds.SOPInstanceUID)


def _remove(ds: Dataset) -> None:
    for keyword in REMOVED & set(ds.dir()):
        delattr(ds, keyword)
    for element in list(ds):
        if element.VR == "SQ":
            for item in element.value:
                _remove(item)
