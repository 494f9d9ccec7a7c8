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

    http_workers: int = Field(default=1, ge=1, le=64)
    """HTTP app processes (uvicorn workers) sharing the port, one per core to use them all.
    Each keeps its own login rate limit and verified-token cache (see README)."""

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

    dicom_pending_interval: float = Field(default=1.0, ge=0)
    """Seconds between Pending responses to a C-GET or C-MOVE: progress for the requester
    without one extra message per instance (PS3.4 C.4.2.3, C.4.3.3: they are optional).
    0 sends one after every sub-operation."""

    dicom_plain: bool = True
    """Serve unencrypted DICOM on SAF_DICOM_PORT; false with TLS set up means TLS only."""

    dicom_tls_cert: Path | None = None
    """PEM certificate (chain) of the DICOM TLS port; with SAF_DICOM_TLS_KEY turns TLS on."""

    dicom_tls_key: Path | None = None
    """PEM private key of SAF_DICOM_TLS_CERT (keep it mode 0600)."""

    dicom_tls_ca: Path | None = None
    """PEM CA bundle that client certificates must chain to; when set, peers must present
    one (mutual TLS). Needed for peers pinned to a certificate (`saf clinic add --cert`)."""

    dicom_tls_port: int = Field(default=2762, ge=0, le=65535)
    """DICOM TLS port (2762 is the registered 'dicom-tls' port; 0: any free port, for tests)."""

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

    outbox_redeliver_seconds: float = Field(default=600.0, gt=0)
    """Seconds after which an event published but not completed (its worker died, or the
    broker lost the message) is published again."""

    forward_poll_interval: float = Field(default=1.0, gt=0)
    """How often the forwarder looks for due forwarding jobs (saf.forwarding)."""

    forward_retry_base_seconds: float = Field(default=30.0, gt=0)
    """Wait before the first retry of a failed forward; doubles each attempt (with jitter)."""

    forward_retry_max_seconds: float = Field(default=3600.0, gt=0)
    """Longest wait between two attempts of one forwarding job."""

    forward_max_age_seconds: float = Field(default=259200.0, gt=0)
    """How long a forwarding job keeps retrying (3 days) before it is failed; `saf forward
    retry --failed` starts it again."""

    commitment_report_max_age_seconds: float = Field(default=86400.0, gt=0)
    """How long a Storage Commitment report keeps retrying (1 day) before it is dropped
    (logged and audited); the requester must then ask again."""

    forward_lease_seconds: float = Field(default=900.0, gt=0)
    """A job in `sending` without progress for this long (its worker died) is taken again."""

    forward_tls_ca: Path | None = None
    """PEM CA bundle a dicoms:// forwarding destination's certificate must chain to;
    default SAF_DICOM_TLS_CA, else the system roots. The hub presents SAF_DICOM_TLS_CERT/KEY
    as its client certificate when the destination asks for one."""

    public_url: str | None = None
    """External base URL of the HTTP app (e.g. https://hub.example.org); client assertions
    must name <public_url>/auth/token as `aud`. Unset: the URL the request came to."""

    access_token_user_seconds: int = Field(default=900, ge=1, le=86400)
    """Lifetime of a person's access token (and of the viewer's session cookie)."""

    access_token_client_seconds: int = Field(default=300, ge=1, le=86400)
    """Lifetime of an EHR client's access token (it asks again with a new assertion)."""

    refresh_token_seconds: int = Field(default=28800, ge=60, le=604800)
    """Lifetime of a person's refresh token (8 h: one working shift)."""

    auth_rate_per_minute: float = Field(default=10.0, gt=0)
    """Sustained login/token attempts per minute allowed from one client address."""

    auth_rate_burst: int = Field(default=20, ge=1)
    """Attempts one address may make at once before the per-minute rate applies."""

    cors_origins: str = ""
    """Web origins (comma-separated, e.g. https://ohif.example.org) allowed to call /dicomweb
    from a browser; empty (the default) allows none. ``*`` allows any origin."""

    stow_max_bytes: int = Field(default=4 << 30, ge=1)
    """Largest STOW-RS request body accepted (bytes); a larger one answers 413."""

    fhir_max_body_bytes: int = Field(default=16 << 20, ge=1)
    """Largest FHIR request body accepted (bytes, 16 MiB by default); a larger one answers
    413 with an OperationOutcome, refused by Content-Length or while reading."""

    subscription_allow_http: bool = False
    """Let FHIR Subscription endpoints use plain http (tests, a lab); https is required
    otherwise (demo mode allows http too)."""

    subscription_timeout_seconds: float = Field(default=10.0, gt=0)
    """Connect and read timeout of one handshake or notification POST."""

    subscription_retry_base_seconds: float = Field(default=30.0, gt=0)
    """Wait before the first retry of a failed notification; doubles each attempt (with
    jitter), capped at SAF_SUBSCRIPTION_RETRY_MAX_SECONDS."""

    subscription_retry_max_seconds: float = Field(default=3600.0, gt=0)
    """Longest wait between two attempts of one notification."""

    subscription_max_attempts: int = Field(default=12, ge=1)
    """Attempts of one notification before it is failed (the subscription shows `error`)."""

    subscription_poll_interval: float = Field(default=1.0, gt=0)
    """How often the notifier in `saf worker` looks for due notifications."""

    demo: bool = False
    """Demo mode: registers a demo clinic and loads a sample study."""

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://")) or "?" in value or "#" in value:
            raise ValueError("SAF_PUBLIC_URL must be a base URL like https://hub.example.org")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_backend(self) -> Settings:
        if self.blob_backend == "s3" and not self.s3_bucket:
            raise ValueError("SAF_BLOB_BACKEND=s3 needs SAF_S3_BUCKET")
        return self

    @model_validator(mode="after")
    def _check_dicom_tls(self) -> Settings:
        if (self.dicom_tls_cert is None) != (self.dicom_tls_key is None):
            raise ValueError("DICOM TLS needs both SAF_DICOM_TLS_CERT and SAF_DICOM_TLS_KEY")
        if self.dicom_tls_ca is not None and self.dicom_tls_cert is None:
            raise ValueError("SAF_DICOM_TLS_CA needs SAF_DICOM_TLS_CERT and SAF_DICOM_TLS_KEY")
        if not self.dicom_plain and self.dicom_tls_cert is None:
            raise ValueError("SAF_DICOM_PLAIN=false (TLS only) needs SAF_DICOM_TLS_CERT/KEY")
        return self

    @property
    def dicom_tls(self) -> bool:
        """Whether the DICOM node serves a TLS port."""
        return self.dicom_tls_cert is not None

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
    def forwarding_path(self) -> Path:
        """The forwarding rules file (see saf.forwarding)."""
        return self.data_dir / "forwarding.toml"

    @property
    def blob_dir(self) -> Path:
        """Root of the local blob store."""
        return self.data_dir / "blobs"

    @property
    def spool_dir(self) -> Path:
        """Private directory for transient received files (deleted after ingest)."""
        return self.data_dir / "spool"

    @property
    def token_keys_path(self) -> Path:
        """The hub's token signing keys (private, mode 0600; see saf.tokens)."""
        return self.data_dir / "token-keys.json"
