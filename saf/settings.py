"""Settings: one pydantic-settings class, read from SAF_* variables, validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from saf.aetitle import check_ae_title
from saf.routing import RULES_FILENAME


class Settings(BaseSettings):
    """Everything an operator can set. Defaults run embedded on one machine."""

    model_config = SettingsConfigDict(env_prefix="SAF_", env_file=None, extra="ignore")

    data_dir: Path = Path("./saf-data")
    """Where the index (SQLite), key ring, local blobs and spool files live."""

    database_url: str | None = None
    """SQLAlchemy URL; default: SQLite in WAL mode at <data_dir>/index.db."""

    keyring_path: Path | None = None
    """Key-encryption key ring (mode 0600); default <data_dir>/keyring.json."""

    blob_backend: Literal["local", "s3"] = "local"
    """Where sealed blobs go: a local directory or an S3-compatible bucket."""

    s3_bucket: str | None = None
    """Bucket for the S3 backend (credentials come from the usual AWS variables)."""

    s3_prefix: str = ""
    """Key prefix inside the bucket, e.g. 'saf/'."""

    s3_endpoint_url: str | None = None
    """S3 endpoint for MinIO, Ceph or a test server; None means AWS."""

    s3_region: str | None = None
    """S3 region name; None takes it from the AWS configuration."""

    http_host: str = "0.0.0.0"
    """Address the HTTP app binds to."""

    http_port: int = Field(default=8000, ge=0, le=65535)
    """HTTP port (health, and later FHIR, DICOMweb and the viewer)."""

    dicom_host: str = "0.0.0.0"
    """Address the DICOM node binds to."""

    dicom_port: int = Field(default=11112, ge=0, le=65535)
    """DICOM port of the node (0: any free port, for tests)."""

    ae_title: str = "SAF"
    """Our AE title (1-16 characters, no backslash)."""

    dicom_accept_unknown: bool = False
    """Accept associations from unregistered AE titles into the 'unassigned' clinic."""

    dicom_require_called_aet: bool = True
    """Reject associations whose called AE title is not ours."""

    dicom_max_pdu: int = Field(default=1 << 20, ge=0)
    """Largest PDU we accept (bytes, 0 = unlimited); large PDUs cut per-PDU overhead."""

    dicom_max_associations: int = Field(default=32, ge=1)
    """How many associations the node serves at once."""

    dicom_network_timeout: float = Field(default=60.0, gt=0)
    """Seconds without traffic before an association is aborted."""

    stable_age_seconds: float = Field(default=10.0, ge=0)
    """A study is complete when no instance has arrived for this many seconds."""

    turnaround_stat_seconds: float = Field(default=3600.0, gt=0)
    """Target time from case creation to reply for a stat case (due time)."""

    turnaround_urgent_seconds: float = Field(default=86400.0, gt=0)
    """Target turnaround for an urgent case."""

    turnaround_routine_seconds: float = Field(default=259200.0, gt=0)
    """Target turnaround for a routine case (3 days)."""

    stable_check_interval: float = Field(default=2.0, gt=0)
    """How often the stable-study timer looks for complete studies."""

    broker_url: str | None = None
    """Celery broker (redis://…, amqp://…); default: an embedded SQLite broker in the data dir."""

    broker_visibility_timeout: float = Field(default=600.0, gt=0)
    """Seconds before Redis hands an unacknowledged task (its worker died) to another worker."""

    outbox_poll_interval: float = Field(default=1.0, gt=0)
    """How often the outbox dispatcher looks for committed events to publish."""

    demo: bool = False
    """Demo mode: registers a demo clinic and loads a sample study."""

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @model_validator(mode="after")
    def _check_backend(self) -> Settings:
        if self.blob_backend == "s3" and not self.s3_bucket:
            raise ValueError("SAF_BLOB_BACKEND=s3 needs SAF_S3_BUCKET")
        return self

    @property
    def effective_database_url(self) -> str:
        """The database URL actually used."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.db').resolve()}"

    @property
    def effective_keyring_path(self) -> Path:
        """The key ring file actually used."""
        return self.keyring_path or self.data_dir / "keyring.json"

    @property
    def effective_broker_url(self) -> str:
        """The broker actually used: durable, server-less SQLite by default."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def rules_path(self) -> Path:
        """The routing rules file (see saf.routing)."""
        return self.data_dir / RULES_FILENAME

    @property
    def blob_dir(self) -> Path:
        """Root of the local blob store."""
        return self.data_dir / "blobs"

    @property
    def spool_dir(self) -> Path:
        """Private directory for transient received files (deleted after ingest)."""
        return self.data_dir / "spool"
