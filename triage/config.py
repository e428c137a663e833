"""One frozen, typed configuration, read once from ``config.toml``.

Every section is a frozen dataclass. Loading is strict: an unknown key or a
value of the wrong type stops start-up with a one-line :class:`ConfigError`
that names the key (and suggests the closest known key for typos). CLI flags
override single fields through :func:`override`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from triage import resources
from triage.core.errors import ConfigError

T = TypeVar("T")

DEFAULT_CONFIG = resources.path("config")


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _check_port(port: int, key: str) -> None:
    _check(0 <= port <= 65535, key, f"port {port} is out of range 0..65535")


def _check_ae(title: str, key: str) -> None:
    _check(
        0 < len(title) <= 16 and title.isascii() and title == title.strip()
        and "\\" not in title and title.isprintable(),
        key,
        f"AE title {title!r} must be 1-16 printable ASCII characters, no backslash,"
        " no leading or trailing spaces",
    )


def _check_host(host: str, key: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        _check(host == "localhost", key, f"{host!r} is not an IP address or 'localhost'")


@dataclass(frozen=True)
class DicomConfig:
    """The DICOM listener (SCP)."""

    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "TRIAGE"
    allowed_calling_aes: tuple[str, ...] = ("STORESCU", "ECHOSCU", "TRIAGE_SCU", "MODALITY1")
    accept_any_calling_ae: bool = False
    max_associations: int = 16
    max_pdu: int = 262144
    max_dataset_mb: int = 512
    max_pixels: int = 100_000_000
    network_timeout_s: float = 60.0
    dimse_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    # {calling AE title: [host address or network, ...]}: who may call from where.
    peers: dict[str, list[str]] = field(default_factory=dict)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    allow_plaintext_remote: bool = False

    def __post_init__(self) -> None:
        _check_host(self.host, "dicom.host")
        for ae, hosts in self.peers.items():
            _check_ae(ae, f"dicom.peers.{ae}")
            _check(isinstance(hosts, list) and bool(hosts), f"dicom.peers.{ae}",
                   "must be a non-empty list of host addresses or networks")
            for h in hosts:
                try:
                    ipaddress.ip_network(str(h), strict=False)
                except ValueError:
                    _check(False, f"dicom.peers.{ae}", f"{h!r} is not an IP address or network")
        _check(bool(self.tls_cert) == bool(self.tls_key), "dicom.tls_cert",
               "tls_cert and tls_key must be set together")
        _check(not self.tls_ca or bool(self.tls_cert), "dicom.tls_ca",
               "verifying clients needs the listener's own tls_cert and tls_key")
        _check(is_loopback(self.host) or bool(self.tls_cert) or self.allow_plaintext_remote,
               "dicom.host", f"{self.host} is not a loopback address and TLS is off: set "
               "dicom.tls_cert and dicom.tls_key, or dicom.allow_plaintext_remote = true on "
               "purpose")
        _check_port(self.port, "dicom.port")
        _check_ae(self.ae_title, "dicom.ae_title")
        for ae in self.allowed_calling_aes:
            _check_ae(ae, "dicom.allowed_calling_aes")
        _check(bool(self.allowed_calling_aes) or bool(self.peers) or self.accept_any_calling_ae,
               "dicom.allowed_calling_aes",
               "is empty; list the callers, or set dicom.accept_any_calling_ae = true on purpose")
        _check(self.max_associations >= 1, "dicom.max_associations", "must be >= 1")
        _check(self.max_dataset_mb >= 1, "dicom.max_dataset_mb", "must be >= 1")
        _check(self.max_pixels >= 1, "dicom.max_pixels", "must be >= 1")
        _check(self.max_pdu == 0 or self.max_pdu >= 4096, "dicom.max_pdu",
               "must be 0 (unlimited) or >= 4096")
        for name in ("network_timeout_s", "dimse_timeout_s", "acse_timeout_s"):
            _check(getattr(self, name) > 0, f"dicom.{name}", "must be > 0")


def is_loopback(host: str) -> bool:
    """Return True when ``host`` (an IP address or 'localhost') is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class WebConfig:
    """The worklist web server and who may open it."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    basic_user: str = ""
    basic_password: str = ""
    session_minutes: float = 480.0
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        _check_host(self.host, "web.host")
        _check(bool(self.tls_cert) == bool(self.tls_key), "web.tls_cert",
               "tls_cert and tls_key must be set together")
        _check(self.session_minutes > 0, "web.session_minutes", "must be > 0")
        _check_port(self.port, "web.port")
        _check(not self.token or (len(self.token) >= MIN_TOKEN_CHARS and self.token.isascii()
                                  and self.token.isprintable() and " " not in self.token),
               "web.token", f"must be empty or at least {MIN_TOKEN_CHARS} printable ASCII "
               "characters without spaces")
        _check(bool(self.basic_user) == bool(self.basic_password), "web.basic_user",
               "basic_user and basic_password must be set together")
        _check(":" not in self.basic_user, "web.basic_user", "must not contain ':'")

    @property
    def auth_required(self) -> bool:
        """True when a token or a basic-auth user is configured."""
        return bool(self.token or self.basic_user)


@dataclass(frozen=True)
class StorageConfig:
    """Where received data and the database live."""

    data_dir: str = "./var"
    min_free_mb: int = 512
    fsync: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.data_dir), "storage.data_dir", "must not be empty")
        _check(self.min_free_mb >= 0, "storage.min_free_mb", "must be >= 0")

    @property
    def root(self) -> Path:
        """The data directory as an absolute path."""
        return Path(self.data_dir).expanduser().resolve()

    @property
    def spool_dir(self) -> Path:
        """Directory holding every acknowledged instance."""
        return self.root / "spool"

    @property
    def db_path(self) -> Path:
        """The SQLite database file."""
        return self.root / "triage.sqlite"


@dataclass(frozen=True)
class DatabaseConfig:
    """Which database holds the record, and the leases that let several daemons share it."""

    url: str = ""
    leader_lease_s: float = 15.0
    sqlite_busy_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        scheme = self.url.partition("://")[0].partition("+")[0]
        # SQLite lives only in the data directory, whose lock keeps a second daemon out;
        # a SQLite file elsewhere could be opened by two daemons with different data
        # directories, each believing it is alone.
        _check(not self.url or (bool(scheme) and "://" in self.url
                                and scheme in ("postgresql", "postgres")),
               "database.url", "must be empty (the SQLite file in storage.data_dir) or a "
               "postgresql:// URL")
        _check(self.leader_lease_s >= 1, "database.leader_lease_s", "must be >= 1")
        _check(0 < self.sqlite_busy_timeout_s <= 600, "database.sqlite_busy_timeout_s",
               "must be > 0 and <= 600")

    @property
    def shared(self) -> bool:
        """Whether several daemons may share this database (PostgreSQL)."""
        return self.url.startswith(("postgresql", "postgres"))


@dataclass(frozen=True)
class StudiesConfig:
    """Grouping instances into studies."""

    quiet_period_s: float = 10.0
    sweep_interval_s: float = 0.25

    def __post_init__(self) -> None:
        _check(self.quiet_period_s >= 0, "studies.quiet_period_s", "must be >= 0")
        _check(self.sweep_interval_s > 0, "studies.sweep_interval_s", "must be > 0")


@dataclass(frozen=True)
class LoggingConfig:
    """Logging (the CLI configures it; library code only logs)."""

    level: str = "INFO"

    def __post_init__(self) -> None:
        _check(self.level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
               "logging.level", f"{self.level!r} is not DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class ModelConfig:
    """The shipped model that ``score``, ``serve`` and ``replay`` load."""

    path: str = "models/cxr-pneumonia-mnv2.onnx"
    card: str = ""
    threads: int = 2
    site_profile: str = ""
    prototypes: str = ""
    allow_cpu_mismatch: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", "must not be empty")
        _check(self.threads >= 1, "model.threads", "must be >= 1")

    @property
    def onnx_path(self) -> Path:
        """The ONNX file; a relative path is resolved against triage's data root.

        The data root is the project folder in a checkout, or the copy inside an
        installed wheel (see :mod:`triage.resources`), so the shipped default
        ``models/cxr-pneumonia-mnv2.onnx`` is found from any directory.
        """
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else resources.data_root() / p

    @property
    def site_profile_path(self) -> Path | None:
        """The site profile (``triage site calibrate``), or None for the card's thresholds.

        A relative path is resolved against the working directory.
        """
        return Path(self.site_profile).expanduser() if self.site_profile else None

    @property
    def prototypes_path(self) -> Path | None:
        """The few-shot prototype file (``triage adapt``), or None when the finding is off.

        A relative path is resolved against the working directory.
        """
        return Path(self.prototypes).expanduser() if self.prototypes else None

    @property
    def card_path(self) -> Path:
        """The model card: ``card`` if set, else the ONNX path with a ``.json`` suffix."""
        if not self.card:
            return self.onnx_path.with_suffix(".json")
        p = Path(self.card).expanduser()
        return p if p.is_absolute() else resources.data_root() / p


_EQUALIZATIONS = ("none", "histogram", "clahe")
_DENOISERS = ("none", "gaussian", "median")


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing chain used for training; a model card carries its own copy."""

    window_percentiles: tuple[float, ...] = (0.5, 99.5)
    equalization: str = "none"
    denoise: str = "none"
    denoise_strength: float = 1.0
    clahe_tiles: int = 8
    clahe_clip_limit: float = 0.01
    mean: float = 0.5
    std: float = 0.25
    aug_rotate_deg: float = 10.0
    aug_translate: float = 0.06
    aug_scale: float = 0.12
    aug_brightness: float = 0.1
    aug_contrast: float = 0.25
    aug_gamma: tuple[float, ...] = (0.8, 1.25)
    aug_crop_scale: tuple[float, ...] = (1.0, 1.0)
    aug_crop_ratio: tuple[float, ...] = (0.75, 1.3333)
    aug_flip: float = 0.0
    train_cache_px: int = 0
    min_size_px: int = 128
    allowed_modalities: tuple[str, ...] = ("CR", "DX", "SC")

    def __post_init__(self) -> None:
        wp = self.window_percentiles
        _check(len(wp) == 2 and 0 <= wp[0] < wp[1] <= 100, "preprocess.window_percentiles",
               "must be two percentiles [low, high] with 0 <= low < high <= 100")
        _check(self.equalization in _EQUALIZATIONS, "preprocess.equalization",
               f"{self.equalization!r} is not one of {', '.join(_EQUALIZATIONS)}")
        _check(self.denoise in _DENOISERS, "preprocess.denoise",
               f"{self.denoise!r} is not one of {', '.join(_DENOISERS)}")
        _check(0 < self.denoise_strength <= 5, "preprocess.denoise_strength", "must be in (0, 5]")
        _check(self.clahe_tiles >= 1, "preprocess.clahe_tiles", "must be >= 1")
        _check(0 < self.clahe_clip_limit <= 1, "preprocess.clahe_clip_limit", "must be in (0, 1]")
        _check(self.std > 0, "preprocess.std", "must be > 0")
        _check(self.min_size_px >= 1, "preprocess.min_size_px", "must be >= 1")
        g, cs, cr = self.aug_gamma, self.aug_crop_scale, self.aug_crop_ratio
        _check(len(g) == 2 and 0 < g[0] <= g[1], "preprocess.aug_gamma",
               "must be [low, high] with 0 < low <= high")
        _check(len(cs) == 2 and 0 < cs[0] <= cs[1] <= 1, "preprocess.aug_crop_scale",
               "must be [low, high] area fractions with 0 < low <= high <= 1")
        _check(len(cr) == 2 and 0 < cr[0] <= cr[1], "preprocess.aug_crop_ratio",
               "must be [low, high] aspect ratios with 0 < low <= high")
        _check(0 <= self.aug_flip <= 1, "preprocess.aug_flip", "must be a probability in [0, 1]")
        _check(self.train_cache_px >= 0, "preprocess.train_cache_px", "must be >= 0")
        for name in ("aug_rotate_deg", "aug_translate", "aug_scale", "aug_brightness",
                     "aug_contrast"):
            _check(getattr(self, name) >= 0, f"preprocess.{name}", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults of ``triage train`` (each is also a CLI flag)."""

    input_size: int = 144
    width_mult: float = 1.0
    dropout: float = 0.2
    epochs: int = 12
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 0.002
    weight_decay: float = 0.0001
    warmup_epochs: float = 0.5
    patience: int = 5
    ema_decay: float = 0.995
    class_weighting: str = "balanced"
    seed: int = 42
    threads: int = 2
    channels_last: bool = True
    loader_workers: int = 1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(16 <= self.input_size <= 1024, "train.input_size", "must be in 16..1024")
        _check(self.width_mult > 0, "train.width_mult", "must be > 0")
        _check(0 <= self.dropout < 1, "train.dropout", "must be in [0, 1)")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.optimizer in ("adam", "adamw"), "train.optimizer", "must be adam or adamw")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.patience >= 1, "train.patience", "must be >= 1")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 = off)")
        _check(self.class_weighting in ("balanced", "none"), "train.class_weighting",
               "must be balanced or none")
        _check(self.threads >= 1, "train.threads", "must be >= 1")
        _check(0 <= self.loader_workers <= 16, "train.loader_workers", "must be 0..16")
        _check(0 <= self.label_smoothing < 0.5, "train.label_smoothing", "must be in [0, 0.5)")


@dataclass(frozen=True)
class OperatingPointConfig:
    """One operating point: a tier name and the target it must meet on the calibration split."""

    name: str = "abnormal"
    metric: str = "sensitivity"
    target: float = 0.95
    # None: follow calibration.conservative; true/false: this point's own choice.
    conservative: bool | None = None

    def __post_init__(self) -> None:
        _check(self.name.isidentifier() and self.name not in ("routine", "unscored"),
               "calibration.operating_points.name",
               f"{self.name!r} must be an identifier other than routine/unscored")
        _check(self.metric in ("sensitivity", "specificity"), "calibration.operating_points.metric",
               f"{self.metric!r} is not sensitivity or specificity")
        _check(0 < self.target < 1, "calibration.operating_points.target", "must be in (0, 1)")


@dataclass(frozen=True)
class CalibrationConfig:
    """Temperature scaling and operating points (``triage calibrate`` and ``export``)."""

    operating_points: tuple[OperatingPointConfig, ...] = (
        OperatingPointConfig("abnormal", "sensitivity", 0.95),
        OperatingPointConfig("urgent", "sensitivity", 0.70),
    )
    conservative: bool = False
    ece_bins: int = 15
    confidence: float = 0.95

    def __post_init__(self) -> None:
        names = [op.name for op in self.operating_points]
        _check(len(names) >= 1 and len(set(names)) == len(names),
               "calibration.operating_points", "need at least one, with distinct names")
        _check(self.ece_bins >= 2, "calibration.ece_bins", "must be >= 2")
        _check(0.5 < self.confidence < 1, "calibration.confidence", "must be in (0.5, 1)")


@dataclass(frozen=True)
class WorkerConfig:
    """The scoring worker inside the daemon."""

    processes: int = 2
    batch_size: int = 16
    poll_interval_s: float = 0.5
    max_studies_in_flight: int = 8
    heatmaps: bool = True
    tier_overrides: dict[str, float] = field(default_factory=dict)
    decode_timeout_s: float = 120.0
    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    claim_lease_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.claim_lease_s >= 1, "worker.claim_lease_s", "must be >= 1")
        _check(1 <= self.processes <= 64, "worker.processes", "must be 1..64")
        _check(self.decode_timeout_s > 0, "worker.decode_timeout_s", "must be > 0")
        _check(1 <= self.max_attempts <= 100, "worker.max_attempts", "must be 1..100")
        _check(self.retry_backoff_s >= 0, "worker.retry_backoff_s", "must be >= 0")
        _check(1 <= self.batch_size <= 256, "worker.batch_size", "must be 1..256")
        _check(self.poll_interval_s > 0, "worker.poll_interval_s", "must be > 0")
        _check(self.max_studies_in_flight >= 1, "worker.max_studies_in_flight", "must be >= 1")
        for name, t in self.tier_overrides.items():
            _check(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0,
                   f"worker.tier_overrides.{name}", "must be a probability in [0, 1]")


@dataclass(frozen=True)
class DriftConfig:
    """The drift watch: recent scores against the model card's reference."""

    interval_s: float = 300.0
    window: int = 500
    min_samples: int = 50
    alpha: float = 0.01
    population_age_years: tuple[float, ...] = (0.0, 17.0)
    population_alert_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check(self.interval_s > 0, "drift.interval_s", "must be > 0")
        a = self.population_age_years
        _check(len(a) == 2 and 0 <= a[0] <= a[1], "drift.population_age_years",
               "must be [youngest, oldest] in years")
        _check(0 < self.population_alert_fraction <= 1, "drift.population_alert_fraction",
               "must be in (0, 1]")
        _check(self.window >= 1, "drift.window", "must be >= 1")
        _check(1 <= self.min_samples <= self.window, "drift.min_samples", "must be 1..drift.window")
        _check(0 < self.alpha < 0.5, "drift.alpha", "must be in (0, 0.5)")


@dataclass(frozen=True)
class WorklistConfig:
    """The worklist: when it is rendered, how it orders, how long reported studies are kept."""

    render_interval_s: float = 15.0
    render_debounce_s: float = 1.0
    refresh_s: int = 30
    routine_max_wait_min: float = 120.0
    retention_days: int = 0
    purge_interval_s: float = 3600.0

    def __post_init__(self) -> None:
        _check(self.render_interval_s > 0, "worklist.render_interval_s", "must be > 0")
        _check(self.render_debounce_s >= 0, "worklist.render_debounce_s", "must be >= 0")
        _check(self.refresh_s >= 0, "worklist.refresh_s", "must be >= 0 (0: no auto-refresh)")
        _check(self.routine_max_wait_min >= 0, "worklist.routine_max_wait_min",
               "must be >= 0 (0: never lift)")
        _check(self.retention_days >= 0, "worklist.retention_days", "must be >= 0 (0: keep all)")
        _check(self.purge_interval_s > 0, "worklist.purge_interval_s", "must be > 0")


@dataclass(frozen=True)
class ReplayConfig:
    """``triage replay``: decoding processes, the reader model and the statistics' resampling.

    The ageing rule of the simulated triage order is the worklist's
    (``worklist.routine_max_wait_min``).
    """

    workers: int = 2
    readers: int = 1
    minutes_per_study: float = 6.0
    reading_time_cv: float = 0.5
    poisson_rate_per_hour: float = 8.0
    seeds: int = 20
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        _check(1 <= self.workers <= 64, "replay.workers", "must be 1..64")
        _check(self.readers >= 1, "replay.readers", "must be >= 1")
        _check(self.minutes_per_study > 0, "replay.minutes_per_study", "must be > 0")
        _check(0 <= self.reading_time_cv <= 5, "replay.reading_time_cv", "must be in [0, 5]")
        _check(self.poisson_rate_per_hour > 0, "replay.poisson_rate_per_hour", "must be > 0")
        _check(1 <= self.seeds <= 10000, "replay.seeds", "must be 1..10000")
        _check(0 <= self.bootstrap <= 100000, "replay.bootstrap", "must be 0..100000 (0: none)")


def _check_destination_host(host: str, key: str) -> None:
    """A destination may be an IP address or a DNS name (a PACS usually has one)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    _check(0 < len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels), key,
           f"{host!r} is not an IP address or a host name")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
SEND_KINDS = ("sr", "overlay")
DESTINATION_KINDS = ("dicom", "dicomweb", "hl7", "fhir")
HL7_MESSAGES = ("oru", "oru+orm")
# The port a destination listens on when the config gives none: DICOM's 104, MLLP's 2575
# (a FHIR server's port is in its URL). UNSET marks "not given" (0 stays an error).
DEFAULT_PORTS = {"dicom": 104, "dicomweb": 0, "hl7": 2575, "fhir": 0}
UNSET_PORT = -1
_HL7_NAME = re.compile(r"[^|^~\\&\r\n]{0,40}")  # no HL7 delimiters in MSH-3..6


@dataclass(frozen=True)
class DestinationConfig:
    """One destination results are sent to: a PACS (DICOM C-STORE, or DICOMweb STOW-RS), a RIS
    (HL7 v2 over MLLP) or an EHR (FHIR R4 over HTTP)."""

    kind: str = "dicom"  # dicom | dicomweb | hl7 | fhir
    ae_title: str = ""
    host: str = ""
    port: int = UNSET_PORT  # not given: the kind's usual port (104 for dicom, 2575 for hl7)
    send: tuple[str, ...] = SEND_KINDS
    name: str = ""
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_check_hostname: bool = True
    # HL7 v2 (kind = "hl7"): MSH-3..6 and what is sent per result version.
    sending_application: str = "TRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message: str = "oru"  # oru | oru+orm
    # FHIR R4 (kind = "fhir"): the server's base URL; DICOMweb (kind = "dicomweb"): the
    # server's DICOMweb root (STOW-RS posts to URL/studies). How to authenticate to either:
    url: str = ""
    bearer_token: str = ""
    basic_user: str = ""
    basic_password: str = ""

    def __post_init__(self) -> None:
        key = "results.destinations"
        _check(self.kind in DESTINATION_KINDS, f"{key}.kind",
               f"{self.kind!r} is not one of {', '.join(DESTINATION_KINDS)}"
               + _suggest(self.kind, DESTINATION_KINDS))
        if self.port == UNSET_PORT:
            object.__setattr__(self, "port", DEFAULT_PORTS[self.kind])
        {"dicom": self._check_dicom, "dicomweb": self._check_dicomweb, "hl7": self._check_hl7,
         "fhir": self._check_fhir}[self.kind]()
        _check(len(self.label) <= 64 and self.label.isprintable(), f"{key}.name",
               "must be at most 64 printable characters")
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file), f"{key}.tls_cert_file",
               "tls_cert_file and tls_key_file must be set together")
        _check(self.tls or self.kind in ("fhir", "dicomweb") or not (self.tls_ca_file or self.tls_cert_file),
               f"{key}.tls", "TLS files are set but tls = false; set tls = true to use them")

    def _check_address(self) -> None:
        key = "results.destinations"
        _check(bool(self.host), f"{key}.host", "is required")
        _check_destination_host(self.host, f"{key}.host")
        _check(1 <= self.port <= 65535, f"{key}.port", f"port {self.port} is out of range 1..65535")

    def _check_dicom(self) -> None:
        key = "results.destinations"
        _check(bool(self.ae_title), f"{key}.ae_title", "is required (the destination's AE title)")
        _check_ae(self.ae_title, f"{key}.ae_title")
        self._check_address()
        self._check_send()

    def _check_dicomweb(self) -> None:
        self._check_http("the server's DICOMweb root, e.g. https://pacs/dicom-web")
        self._check_send()
        _check(self.tls_check_hostname, "results.destinations.tls_check_hostname",
               "cannot be turned off for kind = \"dicomweb\" (give the name the certificate "
               "bears in url, or its CA in tls_ca_file)")

    def _check_send(self) -> None:
        key = "results.destinations"
        _check(bool(self.send) and len(set(self.send)) == len(self.send), f"{key}.send",
               f"list what to send, each once: any of {', '.join(SEND_KINDS)}")
        for kind in self.send:
            _check(kind in SEND_KINDS, f"{key}.send",
                   f"{kind!r} is not one of {', '.join(SEND_KINDS)}"
                   + _suggest(kind, SEND_KINDS))

    def _check_hl7(self) -> None:
        key = "results.destinations"
        self._check_address()
        _check(self.message in HL7_MESSAGES, f"{key}.message",
               f"{self.message!r} is not one of {', '.join(HL7_MESSAGES)}"
               + _suggest(self.message, HL7_MESSAGES))
        for name in ("sending_application", "sending_facility", "receiving_application",
                     "receiving_facility"):
            _check(bool(_HL7_NAME.fullmatch(getattr(self, name))), f"{key}.{name}",
                   "at most 40 characters, none of | ^ ~ \\ & or a line break")

    def _check_fhir(self) -> None:
        self._check_http("the FHIR server's base URL")

    def _check_http(self, what: str) -> None:
        key = "results.destinations"
        _check(self.url.startswith(("http://", "https://")) and " " not in self.url,
               f"{key}.url", f"is required: {what} (http:// or https://)")
        _check("@" not in self.url.split("/")[2], f"{key}.url",
               "must not carry credentials (use bearer_token or basic_user/basic_password)")
        _check(not (self.bearer_token and self.basic_user), f"{key}.bearer_token",
               "set a bearer token or basic_user/basic_password, not both")
        _check(bool(self.basic_user) == bool(self.basic_password), f"{key}.basic_user",
               "basic_user and basic_password must be set together")

    @property
    def label(self) -> str:
        """The destination's name in the outbox and in status: ``name``, else one made from
        its address (AE@host:port, hl7:host:port, or the FHIR base URL)."""
        if self.name:
            return self.name
        if self.kind == "hl7":
            return f"hl7:{self.host}:{self.port}"
        if self.kind in ("fhir", "dicomweb"):
            return self.url[:64]
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def objects(self) -> tuple[str, ...]:
        """The kinds of outbox object this destination is sent: "sr"/"overlay" (dicom and
        dicomweb), "oru" and "orm" (hl7), "fhir"."""
        if self.kind == "hl7":
            return ("oru", "orm") if self.message == "oru+orm" else ("oru",)
        if self.kind == "fhir":
            return ("fhir",)
        return self.send


@dataclass(frozen=True)
class ResultsConfig:
    """Results sent back to the PACS: DICOM SR and overlays, through a durable outbox."""

    calling_ae_title: str = "TRIAGE"
    destinations: tuple[DestinationConfig, ...] = ()
    max_attempts: int = 10
    retry_initial_s: float = 10.0
    retry_max_s: float = 900.0
    poll_interval_s: float = 1.0
    timeout_s: float = 30.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_ae(self.calling_ae_title, "results.calling_ae_title")
        labels = [d.label for d in self.destinations]
        _check(len(set(labels)) == len(labels), "results.destinations",
               "two destinations have the same name (set `name` to tell them apart)")
        _check(self.max_attempts >= 1, "results.max_attempts", "must be >= 1")
        _check(self.retry_initial_s > 0, "results.retry_initial_s", "must be > 0")
        _check(self.retry_max_s >= self.retry_initial_s, "results.retry_max_s",
               "must be >= results.retry_initial_s")
        _check(self.poll_interval_s > 0, "results.poll_interval_s", "must be > 0")
        _check(self.timeout_s > 0, "results.timeout_s", "must be > 0")
        _check(1 <= self.batch_size <= 1000, "results.batch_size", "must be 1..1000")

    def wants(self, kind: str) -> list[DestinationConfig]:
        """Return the destinations that are sent objects of ``kind`` ("sr", "overlay", "oru",
        "orm" or "fhir")."""
        return [d for d in self.destinations if kind in d.objects]


RETRIEVE_MODES = ("c-move", "c-get")
# Keys a pull source may add to its C-FIND (attribute matching at STUDY level, PS3.4 C.6.2.1).
PULL_EXTRA_KEYS = ("BodyPartExamined", "StudyDescription", "InstitutionName",
                   "ReferringPhysicianName", "AccessionNumber")


@dataclass(frozen=True)
class PullSourceConfig:
    """A PACS that triage queries for new studies and retrieves them from (C-FIND, then
    C-MOVE to our own listener or C-GET on the query's association)."""

    name: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 104
    every_s: float = 60.0
    lookback_days: int = 1
    retrieve: str = "c-move"  # c-move | c-get
    modalities: tuple[str, ...] = ("CR", "DX")
    # Extra C-FIND keys, e.g. {BodyPartExamined = "CHEST"} (see PULL_EXTRA_KEYS).
    match: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_check_hostname: bool = True

    def __post_init__(self) -> None:
        key = "pull.sources"
        _check(bool(self.name) and len(self.name) <= 64 and self.name.isprintable()
               and " " not in self.name, f"{key}.name",
               "is required: 1-64 printable characters, no spaces (it names the source in "
               "status, metrics and `triage pull --source`)")
        _check(bool(self.ae_title), f"{key}.ae_title", "is required (the PACS's AE title)")
        _check_ae(self.ae_title, f"{key}.ae_title")
        _check(bool(self.host), f"{key}.host", "is required")
        _check_destination_host(self.host, f"{key}.host")
        _check_port(self.port, f"{key}.port")
        _check(self.every_s >= 1, f"{key}.every_s", "must be >= 1 second")
        _check(1 <= self.lookback_days <= 365, f"{key}.lookback_days", "must be 1..365")
        _check(self.retrieve in RETRIEVE_MODES, f"{key}.retrieve",
               f"{self.retrieve!r} is not one of {', '.join(RETRIEVE_MODES)}"
               + _suggest(self.retrieve, RETRIEVE_MODES))
        _check(bool(self.modalities) and all(
            m.isascii() and m.isalnum() and m.isupper() and len(m) <= 16 for m in self.modalities),
            f"{key}.modalities", "list the modalities to pull, e.g. [\"CR\", \"DX\"]")
        for k, v in self.match.items():
            _check(k in PULL_EXTRA_KEYS, f"{key}.match.{k}",
                   f"not a key triage sends; one of {', '.join(PULL_EXTRA_KEYS)}"
                   + _suggest(k, PULL_EXTRA_KEYS))
            _check(isinstance(v, str) and v.isprintable() and "\\" not in v and len(v) <= 64,
                   f"{key}.match.{k}", "must be a string of at most 64 printable characters")
        _check(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file), f"{key}.tls_cert_file",
               "tls_cert_file and tls_key_file must be set together")
        _check(self.tls or not (self.tls_ca_file or self.tls_cert_file), f"{key}.tls",
               "TLS files are set but tls = false; set tls = true to use them")


@dataclass(frozen=True)
class PullConfig:
    """Pull mode: the PACSs triage polls for today's radiographs."""

    sources: tuple[PullSourceConfig, ...] = ()
    retry_initial_s: float = 30.0
    retry_max_s: float = 900.0

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        _check(len(set(names)) == len(names), "pull.sources", "two sources have the same name")
        _check(self.retry_initial_s > 0, "pull.retry_initial_s", "must be > 0")
        _check(self.retry_max_s >= self.retry_initial_s, "pull.retry_max_s",
               "must be >= pull.retry_initial_s")

    def source(self, name: str) -> PullSourceConfig:
        """Return the source called ``name``. Raises ConfigError (with a suggestion) if none."""
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"no pull source {name!r} in pull.sources"
                          + _suggest(name, [s.name for s in self.sources]))


@dataclass(frozen=True)
class GuardConfig:
    """The input guard: what runs before the model on every image (docs/guard.md)."""

    # The guard network (P(adult), P(frontal)); "" turns the image checks off.
    path: str = "models/cxr-guard.onnx"
    threads: int = 1
    # PatientAge (or PatientBirthDate with StudyDate) outside the model card's population.
    population_header: str = "refuse"  # refuse | warn | off
    # The image looks like an adult's when the header has no age or says a child's.
    population_from_image: str = "refuse"  # refuse | warn | off
    # The image does not look like a frontal chest radiograph.
    view_from_image: str = "when_absent"  # when_absent | always | off
    # The image's embedding lies far from the children's training radiographs'.
    out_of_distribution: str = "refuse"  # refuse | warn | off

    def __post_init__(self) -> None:
        for key, value, allowed in (
                ("population_header", self.population_header, ("refuse", "warn", "off")),
                ("population_from_image", self.population_from_image, ("refuse", "warn", "off")),
                ("view_from_image", self.view_from_image, ("when_absent", "always", "off")),
                ("out_of_distribution", self.out_of_distribution, ("refuse", "warn", "off"))):
            _check(value in allowed, f"guard.{key}", f"must be one of {', '.join(allowed)}")
        _check(self.threads >= 1, "guard.threads", "must be >= 1")

    @property
    def onnx_path(self) -> Path | None:
        """The guard's ONNX file (relative paths against triage's data root), or None when off."""
        if not self.path:
            return None
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else resources.data_root() / p

    @property
    def image_checks(self) -> bool:
        """Whether the guard network is needed at all."""
        return bool(self.path) and (self.population_from_image != "off"
                                    or self.view_from_image != "off"
                                    or self.out_of_distribution != "off")


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    web: WebConfig = field(default_factory=WebConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    worklist: WorklistConfig = field(default_factory=WorklistConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    pull: PullConfig = field(default_factory=PullConfig)

    @property
    def database_url(self) -> str:
        """The database's SQLAlchemy URL: ``database.url``, or the SQLite file in the data
        directory when it is empty."""
        return self.database.url or f"sqlite:///{self.storage.db_path}"


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, "must be a table")
        return _build(typing.cast(type, tp), value, key + ".")
    if origin is tuple:
        _check(isinstance(value, list), key, "must be a list")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if origin is dict:
        _check(isinstance(value, dict), key, "must be a table")
        return dict(value)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'"
                + _suggest(key, fields).replace("'", f"'{prefix}", 1).replace(
                    f"'{prefix}?", "'?")
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"config section '{prefix.rstrip('.')}': {e}") from e


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a parsed TOML mapping.

    Raises ConfigError naming the offending key.
    """
    return _build(Config, data)


def load(path: str | Path | None = None) -> Config:
    """Read and validate a config file (the shipped ``config.toml`` by default).

    Raises ConfigError for a missing file, bad TOML, unknown keys or bad values.
    """
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {p}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    return from_dict(data)


def override(cfg: Config, **changes: Any) -> Config:
    """Return a copy of ``cfg`` with dotted keys replaced, e.g. ``{"dicom.port": 4242}``.

    ``None`` values are ignored so CLI flags that were not given change nothing.
    Raises ConfigError when a key is unknown or a value invalid.
    """
    for dotted, value in changes.items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        sub = getattr(cfg, section, None)
        if sub is None or name not in {f.name for f in dataclasses.fields(sub)}:
            raise ConfigError(f"unknown config key '{dotted}'")
        hint = typing.get_type_hints(type(sub))[name]
        new_sub = dataclasses.replace(sub, **{name: _coerce(value, hint, dotted)})
        cfg = dataclasses.replace(cfg, **{section: new_sub})
    return cfg


def section_from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build one config section (e.g. a model card's ``preprocess``) with the loader's checks.

    Raises ConfigError naming the offending key.
    """
    return _build(cls, data, prefix)
