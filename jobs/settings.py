"""Configuration of the API and the workers: one pydantic Settings object, read from `ALLOY_*`
environment variables.

Secrets (API tokens, hub tokens, the webhook secret) are held as hashes or SecretStr so that they do
not show up in reprs, logs or error messages. API tokens are configured as
`ALLOY_TOKENS='[{"token": "...", "tenant": "acme", "scopes": ["jobs:read", "jobs:write"]}]'` (or with
`"sha256": "<hex>"` instead of the plain token); plain tokens are hashed when the settings load.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Scope = Literal["jobs:read", "jobs:write", "admin"]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenEntry(BaseModel):
    """One API token: only its SHA-256 is kept."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    scopes: list[Scope]

    @model_validator(mode="before")
    @classmethod
    def _hash_plain(cls, data):
        if isinstance(data, dict) and "token" in data:
            data = dict(data)
            data["sha256"] = hash_token(str(data.pop("token")))
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALLOY_", env_ignore_empty=True, extra="ignore")

    database_url: str = Field("", description="SQLAlchemy URL of the job store, SQLite or PostgreSQL "
                              "(default: sqlite:///DATA_DIR/alloy.db)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker")
    data_dir: Path = Field(Path("alloy-data"), description="job outputs, calibration sets, local hub")
    hub_dir: Path | None = Field(None, description="root of the local hub (default: DATA_DIR/hub)")
    hub_endpoint: str | None = Field(None, description="Hugging Face Hub endpoint for `hub: hf` targets")
    hub_tokens: dict[str, SecretStr] = Field(default_factory=dict,
                                             description="tenant -> hub token used when publishing")
    tokens: list[TokenEntry] = Field(default_factory=list, description="API tokens (see module doc)")
    allowed_roots: list[Path] | None = Field(
        None, description="local folders jobs may read models from (default: the working directory)")
    gpu_workers: bool = Field(False, description="route learned/OT jobs to the `gpu` queue")
    max_attempts: int = Field(3, ge=1, description="a job whose worker dies this many times fails")
    # a killed worker's job is back in the queue after lease + one reaper sweep (12 + 2 s): short, while
    # four missed heartbeats in a row (a DB blip) still do not hand a live job to a second worker
    lease_seconds: float = Field(12.0, gt=0, description="a claim expires if not renewed for this long")
    heartbeat_seconds: float = Field(3.0, gt=0, description="how often a running job renews its lease")
    reaper_interval: float = Field(2.0, gt=0, description="seconds between reaper sweeps")
    requeue_after: float = Field(300.0, gt=0,
                                 description="re-send the message of a job queued this long unclaimed")
    progress_interval: float = Field(0.5, gt=0, description="min seconds between progress writes per job")
    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0, description="calibration-set size limit")
    max_body_bytes: int = Field(1024 * 1024, gt=0,
                                description="size limit of JSON request bodies (jobs, schedules): 413 beyond")
    max_active_jobs_per_tenant: int = Field(
        100, ge=0, description="queued + running jobs a tenant may have at once (429 beyond; 0: no limit)")
    job_timeout_seconds: float = Field(
        6 * 3600.0, gt=0, description="wall-clock limit of one attempt of a job; beyond it fails `timeout`")
    hub_namespaces: dict[str, list[str]] = Field(
        default_factory=dict, description="tenant -> local-hub orgs it may publish to (default: the org "
        "named like the tenant; admin tenants publish anywhere)")
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC key for webhook signatures (unset: jobs with `notify` are refused)")
    webhook_allow: list[str] = Field(default_factory=list,
                                     description="allowed webhook hosts (empty: any host)")
    webhook_max_attempts: int = Field(5, ge=1, description="delivery attempts (backoff 1, 2, 4, ... s)")
    webhook_timeout: float = Field(5.0, gt=0, description="seconds to wait for a webhook receiver")
    visibility_timeout: int = Field(3600, gt=0, description="Redis redelivery of reserved, unstarted messages")
    sse_poll_seconds: float = Field(0.3, gt=0, description="how often an event stream looks for new events")
    log_level: str = Field("INFO", description="Python logging level of every process")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("ALLOY_HEARTBEAT_SECONDS must be at most half of ALLOY_LEASE_SECONDS, or a live "
                             "job's lease would expire between two heartbeats")
        return self

    @model_validator(mode="after")
    def _default_db(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir.resolve() / 'alloy.db'}"
        return self

    @property
    def hub_root(self) -> Path:
        return self.hub_dir or self.data_dir / "hub"

    @property
    def roots(self) -> list[Path]:
        return [p.resolve() for p in (self.allowed_roots or [Path.cwd()])]

    def hub_orgs(self, tenant: str) -> list[str]:
        """The local-hub orgs (first part of `org/name`) this tenant may publish to."""
        return self.hub_namespaces.get(tenant, [tenant])

    def is_admin_tenant(self, tenant: str) -> bool:
        """Whether any API token of this tenant has the `admin` scope (for checks made without a request)."""
        return any(e.tenant == tenant and "admin" in e.scopes for e in self.tokens)

    def hub_token(self, tenant: str) -> str | None:
        """The tenant's hub token: from the server's settings only, never from a job body."""
        token = self.hub_tokens.get(tenant)
        return token.get_secret_value() if token else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
