"""Where a repository lives: its regions (the primary and its replicas), failover and sync
settings, and storage tiers. Stored in the repository as ``topology.json`` (FORMAT.md §12),
copied to every replica and to the local cache, so a client that finds the primary dead at
open time still knows where to go. ``cas config apply FILE.yaml`` reads the operators' shape:

    regions:
      primary:   {name: us-east-1,    url: "s3://ckpt-use1/run7",  weight: 100, active: true}
      secondary: {name: us-west-2,    url: "s3://ckpt-usw2/run7",  weight: 0,   active: true}
      dr:        {name: eu-central-1, url: "s3://ckpt-euc1/run7",  weight: 0,   active: false}
    failover: {health_check_interval: 30, failure_threshold: 3, recovery_threshold: 2, auto_failover: true}
    sync:     {mode: async, interval: 300, batch_size: 100}
    tiers:
      hot:     {url: /nvme/ckpt,        retention: 7d}
      warm:    {url: /ssd/ckpt,         retention: 30d}
      archive: {url: "s3://ckpt-archive/run7", storage_class: GLACIER, retention: indefinite}

Secrets are never stored: credentials come from the ``AWS_*`` environment (or the
``storage_options`` given in this process); only an endpoint, region and timeout are kept.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cas.backends import Backend
from cas.errors import ConfigError, ObjectNotFoundError, UsageError
from cas.layout import cache_root

TOPOLOGY_KEY = "topology.json"
log = logging.getLogger("cas")
TOPOLOGY_VERSION = 1
#: storage options kept in the topology; anything else (keys, secrets) stays in the process
KEPT_OPTIONS = ("endpoint", "region", "timeout", "storage_class", "retry_attempts", "retry_base_delay",
                "retry_max_delay")
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w|y)?\s*")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(value: object, what: str) -> float | None:
    """Seconds from ``30``, ``"90s"``, ``"5m"``, ``"12h"``, ``"7d"``, ``"2w"``, ``"1y"``;
    None for ``"indefinite"`` / ``"forever"`` / null."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("indefinite", "forever", "none")):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a duration (examples: 30, 90s, 12h, 7d, indefinite)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.lower())):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
    else:
        raise ConfigError(f"{what}: {value!r} is not a duration (examples: 30, 90s, 12h, 7d, indefinite)")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{what}: {value!r} must be a finite, non-negative duration")
    return seconds


def format_duration(seconds: float | None) -> str | float:
    if seconds is None:
        return "indefinite"
    for unit in ("d", "h", "m"):  # days, as operators write retentions (7d, 30d, 180d)
        n = seconds / _UNIT_S[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return seconds if seconds != int(seconds) else int(seconds)


def _number(value: object, what: str, *, minimum: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{what} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{what} must be at least {minimum}, got {value!r}")
    return float(value)


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value


def _mapping(value: object, what: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(f"{what}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    return value


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{what}: {value!r} is not a name (1-63 letters, digits, . _ -, starting with one of the "
                          "first two)")
    return value


def _url(value: object, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: url must be a path or an s3://BUCKET/PREFIX URL, got {value!r}")
    if "://" in value and value.split("://", 1)[0].lower() not in ("s3", "file", "memory"):
        raise ConfigError(f"{what}: url {value!r} has an unsupported scheme (use a path, file:// or s3://)")
    return value


def kept_options(options: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """The storage options worth storing (endpoint, region, timeout, ...); secrets dropped."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if k in SECRET_OPTIONS:
            continue
        if k not in KEPT_OPTIONS and k not in ("create", "fsync"):
            raise UsageError(f"{what}: unknown storage option {k!r}")
        if k in KEPT_OPTIONS:
            out[k] = v
    return out


def same_location(a: str, b: str, a_options: dict[str, Any] | None = None,
                  b_options: dict[str, Any] | None = None) -> bool:
    """Whether two URLs (with their storage options: an S3 endpoint) name the same store."""
    if normalize_url(a) != normalize_url(b):
        return False
    def endpoint(o: dict[str, Any] | None) -> str:
        return str((o or {}).get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3")
                   or os.environ.get("AWS_ENDPOINT_URL") or "").rstrip("/")
    return "://" not in normalize_url(a) or endpoint(a_options) == endpoint(b_options)


def normalize_url(url: str) -> str:
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


@dataclass(frozen=True)
class RegionSpec:
    """One copy of the repository: ``name`` is its role (primary, secondary, dr), ``region`` the
    place it is in (us-east-1); the highest-``weight`` healthy ``active`` region serves."""

    name: str
    url: str
    region: str | None = None
    weight: float = 0.0
    active: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FailoverSettings:
    health_check_interval: float = 30.0
    failure_threshold: int = 3
    recovery_threshold: int = 2
    auto_failover: bool = True

    def __post_init__(self) -> None:
        _number(self.health_check_interval, "failover.health_check_interval", minimum=0.01)
        _number(self.failure_threshold, "failover.failure_threshold", minimum=1, integer=True)
        _number(self.recovery_threshold, "failover.recovery_threshold", minimum=1, integer=True)
        _bool(self.auto_failover, "failover.auto_failover")


@dataclass(frozen=True)
class SyncSettings:
    mode: str = "async"
    interval: float = 300.0
    batch_size: int = 100

    def __post_init__(self) -> None:
        if self.mode not in ("async", "sync"):
            raise ConfigError(f"sync.mode must be 'async' or 'sync', got {self.mode!r}")
        _number(self.interval, "sync.interval", minimum=0.01)
        _number(self.batch_size, "sync.batch_size", minimum=1, integer=True)


@dataclass(frozen=True)
class TierSpec:
    """A storage tier: data packs stay in it while their age is under ``retention`` seconds
    (None: indefinitely). The first tier is the repository's own store."""

    name: str
    url: str
    retention: float | None = None
    storage_class: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Topology:
    """The whole picture; ``primary`` is the repository's own store."""

    primary: RegionSpec
    replicas: dict[str, RegionSpec] = field(default_factory=dict)
    failover: FailoverSettings | None = None
    sync: SyncSettings = field(default_factory=SyncSettings)
    tiers: list[TierSpec] = field(default_factory=list)

    def regions(self) -> list[RegionSpec]:
        return [self.primary, *self.replicas.values()]

    def to_json(self) -> bytes:
        body = {
            "version": TOPOLOGY_VERSION,
            "primary": self.primary.to_dict(),
            "replicas": {n: r.to_dict() for n, r in self.replicas.items()},
            "failover": asdict(self.failover) if self.failover else None,
            "sync": asdict(self.sync),
            "tiers": [t.to_dict() for t in self.tiers],
        }
        return json.dumps(body, indent=2).encode() + b"\n"  # replicas keep their order (preference)

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Topology:
        try:
            body = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where} is unreadable ({exc}); rewrite it with `cas config apply`") from None
        if not isinstance(body, dict) or not isinstance(body.get("version"), int):
            raise ConfigError(f"{where} is not a cas topology")
        if body["version"] > TOPOLOGY_VERSION:
            raise ConfigError(f"{where} has topology version {body['version']}; this cas reads up to "
                              f"{TOPOLOGY_VERSION}: upgrade cas")
        try:
            primary = _region_spec(body["primary"])
            replicas = {n: _region_spec(r) for n, r in dict(body.get("replicas") or {}).items()}
            failover = FailoverSettings(**body["failover"]) if body.get("failover") else None
            sync = SyncSettings(**(body.get("sync") or {}))
            tiers = [TierSpec(**t) for t in body.get("tiers") or []]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where} is malformed: {exc}") from None
        return cls(primary, replicas, failover, sync, tiers)

    # -- YAML --------------------------------------------------------------------------

    def to_yaml(self) -> str:
        regions: dict[str, Any] = {}
        for r in self.regions():
            entry: dict[str, Any] = {"name": r.region or r.name, "url": r.url, "weight": r.weight, "active": r.active}
            entry.update(r.storage_options)
            regions[r.name] = entry
        doc: dict[str, Any] = {"regions": regions}
        if self.failover is not None:
            doc["failover"] = asdict(self.failover)
        doc["sync"] = asdict(self.sync)
        if self.tiers:
            doc["tiers"] = {
                t.name: {"url": t.url, "retention": format_duration(t.retention),
                         **({"storage_class": t.storage_class} if t.storage_class else {}), **t.storage_options}
                for t in self.tiers
            }
        return yaml.safe_dump(doc, sort_keys=False)


def _region_spec(d: dict[str, Any]) -> RegionSpec:
    return RegionSpec(name=d["name"], url=d["url"], region=d.get("region"), weight=float(d.get("weight", 0.0)),
                      active=bool(d.get("active", True)), storage_options=dict(d.get("storage_options") or {}))


_REGION_KEYS = {"name", "url", "weight", "active", *KEPT_OPTIONS}
_TIER_KEYS = {"url", "retention", "storage_class", "endpoint", "region", "timeout"}


def apply_yaml(current: Topology, text: str, repository_url: str,
               repository_options: dict[str, Any] | None = None) -> Topology:
    """``current`` with the sections the YAML document names replaced (any subset of them)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {' '.join(str(exc).split())}") from None
    if doc is None:
        doc = {}
    doc = _mapping(doc, "the topology file", {"regions", "failover", "sync", "tiers"})
    primary, replicas = current.primary, dict(current.replicas)
    if "regions" in doc:
        regions = _mapping(doc["regions"] or {}, "regions", set(doc["regions"] or {}))
        primary_role = None
        parsed: dict[str, RegionSpec] = {}
        for raw_role, raw_spec in regions.items():
            role = _name(raw_role, "regions")
            spec = _mapping(raw_spec, f"regions.{role}", _REGION_KEYS)
            if "url" not in spec:
                raise ConfigError(f"regions.{role} needs a url")
            url = _url(spec["url"], f"regions.{role}")
            weight = _number(spec.get("weight", 0), f"regions.{role}.weight", minimum=0)
            active = _bool(spec.get("active", True), f"regions.{role}.active")
            region = spec.get("name")
            if region is not None and not isinstance(region, str):
                raise ConfigError(f"regions.{role}.name must be a region name, got {region!r}")
            options = {k: v for k, v in spec.items() if k in KEPT_OPTIONS}
            parsed[role] = RegionSpec(role, url, region, weight, active, options)
            if same_location(url, repository_url, options, repository_options):
                if primary_role is not None:
                    raise ConfigError(f"regions: {primary_role} and {role} both name this repository's store")
                primary_role = role
        if primary_role is None:
            raise ConfigError(
                f"regions: none of them is this repository ({repository_url}); the region whose url is the "
                "repository's own is its primary"
            )
        primary = parsed.pop(primary_role)
        replicas = parsed
    failover = current.failover
    if "failover" in doc:
        f = _mapping(doc["failover"] or {}, "failover",
                     {"health_check_interval", "failure_threshold", "recovery_threshold", "auto_failover"})
        if "health_check_interval" in f:
            f = {**f, "health_check_interval": parse_duration(f["health_check_interval"],
                                                              "failover.health_check_interval")}
        failover = FailoverSettings(**f)
    sync = current.sync
    if "sync" in doc:
        s = _mapping(doc["sync"] or {}, "sync", {"mode", "interval", "batch_size"})
        if "interval" in s:
            s = {**s, "interval": parse_duration(s["interval"], "sync.interval")}
        sync = SyncSettings(**s)
    tiers = current.tiers
    if "tiers" in doc:
        t = doc["tiers"] or {}
        if not isinstance(t, dict):
            raise ConfigError("tiers must be a mapping of tier name to {url, retention, storage_class}")
        tiers = [
            tier_spec(_name(n, "tiers"), **_mapping(spec, f"tiers.{n}", _TIER_KEYS)) for n, spec in t.items()
        ]
    top = Topology(primary, replicas, failover, sync, tiers)
    check_tiers(top.tiers, repository_url)
    return top


def tier_spec(name: str, url: str, retention: object = None, storage_class: str | None = None,
              storage_options: dict[str, Any] | None = None, **options: Any) -> TierSpec:
    """A tier from its fields; its store's options given flat (``endpoint=...``, as in YAML) or as
    ``storage_options`` (as FORMAT.md §13 stores them), or both."""
    name = _name(name, "tiers")
    if storage_options is not None:
        if not isinstance(storage_options, dict):
            raise ConfigError(f"tiers.{name}.storage_options must be a mapping, got {storage_options!r}")
        options = {**storage_options, **options}
    if storage_class is not None and not (isinstance(storage_class, str) and re.fullmatch(r"[A-Z_]{2,32}",
                                                                                          storage_class)):
        raise ConfigError(f"tiers.{name}.storage_class: {storage_class!r} is not a storage class (e.g. GLACIER)")
    return TierSpec(name, _url(url, f"tiers.{name}"), parse_duration(retention, f"tiers.{name}.retention"),
                    storage_class, kept_options(options, f"tiers.{name}"))


def check_tiers(tiers: list[TierSpec], repository_url: str) -> None:
    """The first tier is the repository itself; retentions grow; only the last may be indefinite."""
    if not tiers:
        return
    if len({t.name for t in tiers}) != len(tiers):
        raise ConfigError("tiers: two tiers have the same name")
    if not same_location(tiers[0].url, repository_url):
        raise ConfigError(
            f"tiers: the first tier ({tiers[0].name}: {tiers[0].url}) must be this repository's own store "
            f"({repository_url}); new packs land there and metadata stays there"
        )
    seen = set()
    for t in tiers:
        where = normalize_url(t.url)
        if where in seen:
            raise ConfigError(f"tiers: {t.name} uses the same store as another tier ({t.url})")
        seen.add(where)
    for a, b in itertools.pairwise(tiers):
        if a.retention is None:
            raise ConfigError(f"tiers: {a.name} keeps packs indefinitely, so no pack would ever reach {b.name}")
        if b.retention is not None and b.retention <= a.retention:
            raise ConfigError(f"tiers: {b.name}'s retention must be longer than {a.name}'s")


def default_topology(repository_url: str, storage_options: dict[str, Any] | None = None) -> Topology:
    options = {k: v for k, v in (storage_options or {}).items() if k in KEPT_OPTIONS}
    return Topology(RegionSpec("primary", repository_url, weight=100.0, storage_options=options))


def read_topology(backend: Backend, repository_url: str, storage_options: dict[str, Any] | None = None) -> Topology:
    try:
        data = backend.read(TOPOLOGY_KEY)
    except ObjectNotFoundError:
        return default_topology(repository_url, storage_options)
    return Topology.from_json(data, f"{backend.describe()}/{TOPOLOGY_KEY}")


def write_topology(backend: Backend, topology: Topology) -> None:
    backend.write(TOPOLOGY_KEY, topology.to_json())


def _cache_file(url: str) -> Path:
    digest = hashlib.sha256(normalize_url(url).encode()).hexdigest()[:32]
    return cache_root() / "topology" / f"{digest}.json"


def cache_topology(topology: Topology, *urls: str) -> None:
    """Keep a copy on this machine under each URL the repository is known by."""
    data = topology.to_json()
    for url in {normalize_url(u) for u in urls}:
        path = _cache_file(url)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")  # many openers at once
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:  # a cache: a read-only or full home directory must not stop an open
            tmp.unlink(missing_ok=True)
            log.warning("cas: could not cache the topology in %s: %s", path.parent, exc)


def cached_topology(url: str) -> Topology | None:
    """The topology last seen for a repository known by ``url``, if this machine has one."""
    path = _cache_file(url)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return Topology.from_json(data, str(path))
    except ConfigError:
        return None
