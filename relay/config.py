"""The configuration: top-level settings, per-destination delivery settings, and strict validation.

`load_config()` gathers every problem in the file before failing, each naming the key path, the file and
line, and for unknown keys the nearest valid one.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from relay.destination import BatchDefaults
from relay.errors import ConfigError, ConfigIssue
from relay.plugins import PluginType, Registry
from relay.settings import ByteSize, Duration, HostPort, Settings
from relay.workers import auto_count
from relay.yamlfile import LoadedYaml, Path_, load_yaml, substitute

__all__ = [
    "BatchSettings",
    "Config",
    "DeliverySettings",
    "DestinationConfig",
    "FilterSettings",
    "RetrySettings",
    "SourceConfig",
    "load_config",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class LogSettings(Settings):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"
    """`auto`: console output on a terminal, JSON lines otherwise."""


class MetricsSettings(Settings):
    listen: HostPort | None = "127.0.0.1:9464"
    """Where `/metrics`, `/healthz` and `/readyz` are served; null turns the endpoint off."""


class JournalSettings(Settings):
    max_size: ByteSize = Field(default=1024**3, gt=0)
    """Sources pause when the journal holds this much; nothing is dropped."""
    retention: Duration = 24 * 3600.0
    """How long delivered entries stay (for dedupe and `relay replay`) unless their space is needed."""


class BatchSettings(Settings):
    max_entries: int | None = Field(default=None, gt=0)
    max_bytes: ByteSize | None = Field(default=None, gt=0)
    max_wait: Duration | None = None


class RetrySettings(Settings):
    initial_backoff: Duration = Field(default=1.0, gt=0)
    max_backoff: Duration = Field(default=300.0, gt=0)


class FilterSettings(Settings):
    actions: list[str] = []
    """Globs an entry's action must match (any of them); empty means all actions."""
    exclude_actions: list[str] = []
    actor_types: list[str] = []
    target_types: list[str] = []
    """The entry must have at least one target of these types."""


class DeliverySettings(Settings):
    """Settings every destination has, whatever its type."""

    type: str
    batch: BatchSettings = BatchSettings()
    retry: RetrySettings = RetrySettings()
    filter: FilterSettings = FilterSettings()
    drop_fields: list[str] = []
    start_at: Literal["oldest", "newest"] = "oldest"
    concurrency: int | None = Field(default=None, gt=0, le=64)
    send_timeout: Duration = Field(default=60.0, gt=0)


def _worker_count(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 32):
        return value
    raise ValueError(f"must be `auto` or a number of processes from 0 to 32, not {value!r}")


class TopLevel(Settings):
    state_dir: Path | None = None
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    journal: JournalSettings = JournalSettings()
    shutdown_timeout: Duration = 30.0
    parse_workers: Annotated[Literal["auto"] | int, BeforeValidator(_worker_count)] = "auto"
    sources: dict[str, dict[str, Any]] = {}
    destinations: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class SourceConfig:
    name: str
    type: str
    settings: Any
    plugin: PluginType


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    type: str
    settings: Any
    delivery: DeliverySettings
    batch: BatchDefaults
    """The effective batch limits: the user's `batch:` over the type's defaults."""
    concurrency: int
    plugin: PluginType


@dataclass(frozen=True)
class Config:
    file: str
    state_dir: Path
    log: LogSettings
    metrics: MetricsSettings
    journal: JournalSettings
    shutdown_timeout: float
    sources: Mapping[str, SourceConfig]
    destinations: Mapping[str, DestinationConfig]
    parse_workers: int = 0
    """Worker processes that parse and validate large input (`relay.workers`); 0: on the event loop."""


def load_config(path: str | os.PathLike[str], registry: Registry,
                env: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a configuration file; raise `ConfigError` listing every problem."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the configuration: {exc.strerror}", file)]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([ConfigIssue("", f"the configuration is not UTF-8 text ({exc.reason}, byte "
                                           f"{raw[exc.start]:#04x})", file, line)]) from None
    return parse_config(text, file, registry, os.environ if env is None else env)


def parse_config(text: str, file: str, registry: Registry, env: Mapping[str, str]) -> Config:
    loaded = load_yaml(text, file)
    if not isinstance(loaded.data, dict):
        raise ConfigError([loaded.issue((), "the configuration must be a mapping of keys to values")])
    issues = substitute(loaded, env, Path(file).resolve().parent)
    # A value whose `${...}` failed is reported once, not again as empty or invalid by validation.
    substituted, unresolved = len(issues), {issue.path for issue in issues}
    data: dict[str, Any] = loaded.data

    top = _validate(TopLevel, {k: v for k, v in data.items() if k not in ("sources", "destinations")},
                    (), loaded, issues)
    sources: dict[str, SourceConfig] = {}
    for name, raw in _section(data, "sources", loaded, issues):
        if (source := _source(name, raw, registry, loaded, issues)) is not None:
            sources[name] = source
    destinations: dict[str, DestinationConfig] = {}
    for name, raw in _section(data, "destinations", loaded, issues):
        if (destination := _destination(name, raw, registry, loaded, issues)) is not None:
            destinations[name] = destination
    if not issues and not sources and not destinations:
        issues.append(loaded.issue((), "no sources and no destinations are configured"))
    if issues or top is None:
        kept = [i for n, i in enumerate(issues) if n < substituted or i.path not in unresolved]
        raise ConfigError(sorted(kept, key=lambda i: (i.line or 0, i.path)))

    state_dir = top.state_dir
    if state_dir is None:
        systemd_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
        state_dir = Path(systemd_dir) if systemd_dir else Path("state")
    parse_workers = auto_count() if top.parse_workers == "auto" else top.parse_workers
    return Config(file, state_dir, top.log, top.metrics, top.journal, top.shutdown_timeout,
                  sources, destinations, parse_workers)


def _section(data: dict[str, Any], key: str, loaded: LoadedYaml,
             issues: list[ConfigIssue]) -> list[tuple[str, Any]]:
    section = data.get(key)
    if section is None:
        return []
    if not isinstance(section, dict):
        issues.append(loaded.issue((key,), f"must be a mapping of names to {key[:-1]} settings"))
        return []
    out = []
    for name in section:
        if not _NAME.match(name):
            issues.append(loaded.issue((key, name), "names use lower-case letters, digits, '-' and '_' "
                                                     "(it appears in metric labels and file names)"))
        elif not isinstance(section[name], dict):
            issues.append(loaded.issue((key, name), "must be a mapping with at least `type`"))
        else:
            out.append((name, section[name]))
    return out


def _plugin_type(path: Path_, raw: dict[str, Any], table: Mapping[str, PluginType], kind: str,
                 loaded: LoadedYaml, issues: list[ConfigIssue]) -> PluginType | None:
    type_name = raw.get("type")
    if type_name is None:
        issues.append(loaded.issue(path, f"`type` is required (one of: {', '.join(sorted(table))})"))
        return None
    if not isinstance(type_name, str) or type_name not in table:
        hint = _suggest(str(type_name), table)
        issues.append(loaded.issue((*path, "type"), f"unknown {kind} type {str(type_name)[:60]!r}{hint} "
                                                   f"(installed: {', '.join(sorted(table))})"))
        return None
    return table[type_name]


def _source(name: str, raw: dict[str, Any], registry: Registry, loaded: LoadedYaml,
            issues: list[ConfigIssue]) -> SourceConfig | None:
    path: Path_ = ("sources", name)
    plugin = _plugin_type(path, raw, registry.sources, "source", loaded, issues)
    if plugin is None:
        return None
    settings = _validate(plugin.cls.Settings, {k: v for k, v in raw.items() if k != "type"}, path,
                         loaded, issues, extra_keys=("type",))
    return SourceConfig(name, plugin.name, settings, plugin) if settings is not None else None


def _destination(name: str, raw: dict[str, Any], registry: Registry, loaded: LoadedYaml,
                 issues: list[ConfigIssue]) -> DestinationConfig | None:
    path: Path_ = ("destinations", name)
    plugin = _plugin_type(path, raw, registry.destinations, "destination", loaded, issues)
    if plugin is None:
        return None
    common = set(DeliverySettings.model_fields)
    delivery = _validate(DeliverySettings, {k: v for k, v in raw.items() if k in common}, path, loaded, issues)
    settings = _validate(plugin.cls.Settings, {k: v for k, v in raw.items() if k not in common}, path,
                         loaded, issues, extra_keys=tuple(common))
    if delivery is None or settings is None:
        return None
    defaults: BatchDefaults = plugin.cls.batch_defaults
    batch = BatchDefaults(
        max_entries=delivery.batch.max_entries or defaults.max_entries,
        max_bytes=delivery.batch.max_bytes or defaults.max_bytes,
        max_wait=defaults.max_wait if delivery.batch.max_wait is None else delivery.batch.max_wait,
    )
    if delivery.retry.initial_backoff > delivery.retry.max_backoff:
        issues.append(loaded.issue((*path, "retry", "initial_backoff"), "must not exceed retry.max_backoff"))
        return None
    concurrency = delivery.concurrency or plugin.cls.default_concurrency(settings)
    return DestinationConfig(name, plugin.name, settings, delivery, batch, concurrency, plugin)


def _validate(model: type[BaseModel], raw: dict[str, Any], base: Path_, loaded: LoadedYaml,
              issues: list[ConfigIssue], extra_keys: tuple[str, ...] = ()) -> Any:
    """Validate `raw` against `model`; turn each pydantic error into a located, secret-free issue."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        located = [(_locate(model, raw, error["loc"]), error)
                   for error in exc.errors(include_url=False, include_input=False)]
        fitting = {where.union for where, _ in located if where.fits}
        for where, error in located:
            if where.union is not None and not where.fits and where.union in fitting:
                continue  # a union member the input's shape rules out: its complaint is noise
            issues.append(loaded.issue((*base, *where.loc), _message(error, model, where.loc, extra_keys)))
        return None


@dataclass(frozen=True)
class _Located:
    loc: tuple[Any, ...]
    """The error's key path, without the member tags pydantic inserts for a union (`literal['none']`)."""
    union: tuple[Any, ...] | None
    """Key path of the first union on the way, if any."""
    fits: bool
    """False when the error comes from a union member the input's shape rules out: a settings model when
    the input is not a mapping, or a plain value when it is."""


def _locate(model: type[BaseModel], raw: Any, loc: tuple[Any, ...]) -> _Located:
    current: Any = model
    value: Any = raw
    path: list[Any] = []
    union: tuple[Any, ...] | None = None
    fits = True
    parts = list(loc)
    while parts:
        while typing.get_origin(current) is typing.Annotated:
            current = typing.get_args(current)[0]
        if typing.get_origin(current) in (typing.Union, types.UnionType):
            members = [m for m in typing.get_args(current) if m is not type(None)]
            if len(members) == 1:  # `X | None`: pydantic tags nothing
                current = members[0]
                continue
            member = _member(str(parts.pop(0)), members)
            if union is None:
                union, fits = tuple(path), _is_model(member) == isinstance(value, dict)
            current = member
            continue
        part = parts.pop(0)
        path.append(part)
        if _is_model(current):
            field = current.model_fields.get(str(part)) or next(
                (f for f in current.model_fields.values() if f.alias == part), None)
            current = field.annotation if field is not None else Any
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        elif typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        else:
            current = Any
        value = value.get(part) if isinstance(value, dict) else (
            value[part] if isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value) else None)
    return _Located(tuple(path), union, fits)


def _member(tag: str, members: list[Any]) -> Any:
    """The union member a pydantic loc tag names: `AuthSettings`, `function-after[..., AuthSettings]`,
    `literal['none']`, `str`."""
    for member in members:
        if _is_model(member) and re.search(rf"\b{member.__name__}\b", tag):
            return member
    if tag.startswith("literal["):
        return next((m for m in members if typing.get_origin(m) is Literal), members[0])
    return next((m for m in members if getattr(m, "__name__", None) == tag),
                next((m for m in members if not _is_model(m)), members[0]))


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _message(error: Any, model: type[BaseModel], loc: tuple[Any, ...], extra_keys: tuple[str, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc[:-1]) | (set(extra_keys) if len(loc) == 1 else set())
        return f"unknown key{_suggest(str(loc[-1]), valid)}"
    if kind == "missing":
        return "required key is missing"
    message: str = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _suggest(word: str, candidates: Any) -> str:
    match = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    """The valid keys of the nested model at `loc`, for typo suggestions."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return set()
            current = _unwrap(field.annotation)
        elif typing.get_origin(current) is dict:
            current = _unwrap(typing.get_args(current)[1])
        elif typing.get_origin(current) is list:
            current = _unwrap(typing.get_args(current)[0])
        else:
            return set()
    if isinstance(current, type) and issubclass(current, BaseModel):
        return {f.alias or n for n, f in current.model_fields.items()}
    return set()


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        else:
            return annotation
