"""Settings: ``MESH_*`` environment variables, optionally a ``mesh.toml``.

Precedence: constructor arguments, then environment, then ``mesh.toml`` (in the
working directory, or the file named by ``MESH_CONFIG``), then defaults.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_HOME = Path(".mesh")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore", validate_default=True)

    home: Path = DEFAULT_HOME
    prefix: str = "mesh"
    # The tenant this process publishes and consumes as (MESH_TENANT; mesh/tenants.py).
    tenant: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    # While targets of 2+ tenants are active, the share of an egress instance's in-flight
    # requests one tenant may hold (services/egress/fairness.py).
    egress_tenant_share: float = Field(default=0.5, gt=0, le=1)

    # Broker. nats_url unset means the embedded server on 127.0.0.1:nats_port.
    nats_url: str | None = None
    nats_port: int = Field(default=4222, ge=1, le=65535)
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: Path | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    connect_timeout: float = 5.0
    # The embedded broker fsyncs before it acknowledges a publish; "lazy" trades that for
    # speed (nats-server's default, fsync every two minutes). mesh/durability.py.
    broker_sync: Literal["always", "lazy"] = "always"

    # JetStream.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    stream_max_age_days: float = 7.0
    duplicate_window_s: float = 120.0
    # Consumers the events stream may hold: one per target, plus the sink's and replays'.
    # nats-server 2.15 limits a stream to 1,000 unless the stream sets its own limit (and
    # -1, "unlimited", is read as "use the default"), so a mesh of 1,000 tenants with 3
    # targets each could not create its consumers. Each consumer costs server memory and
    # an idle pull per window in the egress (services/egress/worker.py).
    max_consumers: int = Field(default=100_000, ge=1)
    max_hops: int = 8
    # A delivery not acked within this long (at least) goes to another consumer. Tests
    # lower it to see redelivery quickly; production wants it well above a handler's time.
    ack_wait_min_s: float = Field(default=30.0, gt=0)

    # Storage and secrets.
    db_url: str = ""  # MESH_DB_URL; empty: sqlite:///$MESH_HOME/mesh.db
    key_file: Path | None = None
    encryption: bool = True
    key_rotation_days: int = 90

    # Retention: the sink deletes older rows every prune_interval_s (and soon after it
    # starts), prune_batch rows per transaction. 0 (or empty) keeps a table forever.
    # Events with their delivery attempts: a month answers "what happened to order X"
    # well past any retry or replay window (MESH_EVENTS keeps 7 days).
    event_retention_days: float = Field(default=30.0, ge=0)
    # Heartbeat samples (one a minute per instance, more on status changes): a week
    # covers an incident review; older samples are noise.
    health_retention_days: float = Field(default=7.0, ge=0)
    # Dead letters: kept. A dead letter is undelivered work, and once MESH_DLQ ages it
    # out (30 days) the row may be the last copy of the event.
    dead_letter_retention_days: float = Field(default=0.0, ge=0)
    prune_interval_s: float = Field(default=3600.0, gt=0)
    prune_batch: int = Field(default=1000, ge=1, le=50_000)

    # Backups (mesh/backup): the scheduled service takes one every backup_every ("1h",
    # "30m"; unset: no schedule), keeps the newest backup_keep in backup_dir
    # (default $MESH_HOME/backups), and seals the keys with the passphrase in the file.
    backup_every: str | None = None
    backup_keep: int = Field(default=24, ge=1)
    backup_dir: Path | None = None
    backup_passphrase_file: Path | None = None

    # Services.
    http_port: int = Field(default=9400, ge=0, le=65535)
    bridge_port: int = Field(default=9401, ge=0, le=65535)
    # Loopback by default: a laptop's dashboard is not for the network. Containers and
    # servers set 0.0.0.0 (docker-compose.yml does).
    http_host: str = "127.0.0.1"
    bridge_host: str = "127.0.0.1"
    bridge_tls_cert: Path | None = None  # with bridge_tls_key: the bridge serves wss://
    bridge_tls_key: Path | None = None
    # The HTTP API (services/api): loopback by default like the others; TLS by config.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=9402, ge=0, le=65535)
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    # Requests per second per API key, per API instance (a key may carry its own).
    api_rate: float = Field(default=1000.0, gt=0)
    allow_private_targets: bool = False
    heartbeat_interval_s: float = 5.0
    drain_timeout_s: float = 10.0
    log_format: str = "auto"  # auto | json | console
    # CLI: no "no mesh services are running" warning on stderr (scripts; `mesh --quiet`).
    quiet: bool = False
    log_level: str = "info"

    @field_validator(
        "event_retention_days",
        "health_retention_days",
        "dead_letter_retention_days",
        mode="before",
    )
    @classmethod
    def _empty_is_forever(cls, value: Any) -> Any:
        return 0.0 if value is None or (isinstance(value, str) and not value.strip()) else value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.key_file is None:
            self.key_file = self.home / "keys" / "encryption.key"
        if not self.db_url:
            self.db_url = f"sqlite:///{self.home / 'mesh.db'}"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("MESH_CONFIG", "mesh.toml"))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
        )

    # Derived values -------------------------------------------------------

    @property
    def embedded(self) -> bool:
        return self.nats_url is None

    @property
    def servers(self) -> list[str]:
        if self.nats_url:
            return [u.strip() for u in self.nats_url.split(",") if u.strip()]
        return [f"nats://127.0.0.1:{self.nats_port}"]

    @property
    def key_path(self) -> Path:
        assert self.key_file is not None
        return self.key_file

    @property
    def nats_store_dir(self) -> Path:
        return self.home / "nats"

    @property
    def backups_dir(self) -> Path:
        return self.backup_dir or self.home / "backups"

    @property
    def metrics_dir(self) -> Path:
        return self.home / "metrics"

    @property
    def retention_enabled(self) -> bool:
        return any(
            (self.event_retention_days, self.health_retention_days, self.dead_letter_retention_days)
        )

    def retention_cutoffs(self, now: datetime) -> dict[str, datetime | None]:
        """``Store.prune`` keyword arguments for the retention periods, as of ``now``."""

        def cutoff(days: float) -> datetime | None:
            return now - timedelta(days=days) if days > 0 else None

        return {
            "events_before": cutoff(self.event_retention_days),
            "health_checks_before": cutoff(self.health_retention_days),
            "dead_letters_before": cutoff(self.dead_letter_retention_days),
        }

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (credentials and TLS passed through)."""
        opts: dict[str, Any] = {
            "servers": self.servers,
            "connect_timeout": self.connect_timeout,
        }
        if self.nats_user:
            opts["user"] = self.nats_user
            opts["password"] = self.nats_password or ""
        if self.nats_token:
            opts["token"] = self.nats_token
        if self.nats_creds:
            opts["user_credentials"] = str(self.nats_creds)
        if self.nats_tls_ca or self.nats_tls_cert:
            import ssl

            ctx = ssl.create_default_context(
                cafile=str(self.nats_tls_ca) if self.nats_tls_ca else None
            )
            if self.nats_tls_cert:
                ctx.load_cert_chain(
                    str(self.nats_tls_cert), str(self.nats_tls_key) if self.nats_tls_key else None
                )
            opts["tls"] = ctx
        return opts


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning pydantic's or TOML's error into a one-line ``ConfigError``."""
    from pydantic import ValidationError as PydValidationError

    from mesh.errors import ConfigError

    try:
        return Settings(**overrides)
    except PydValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid setting MESH_{loc.upper()}: {first['msg']}") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError: a mesh.toml that is not TOML
        path = os.environ.get("MESH_CONFIG", "mesh.toml")
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
