"""Configuration: flags > environment (DIFFMESH_*) > YAML file > defaults, validated at start-up.

A service declares its settings as a dataclass whose fields carry help text and bounds (see
`setting`); `load_config` fills it from the four sources and raises ConfigError naming the
setting, the source and the value when anything is wrong, so a bad deployment fails at start-up
instead of on the first request.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

ENV_PREFIX = "DIFFMESH_"
CONFIG_FILE_ENV = ENV_PREFIX + "CONFIG"

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with the metadata load_config validates against."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ServerConfig:
    """Settings every service shares."""

    host: str = setting("127.0.0.1", "address to bind (0.0.0.0 in a container)")
    port: int = setting(50050, "gRPC port", min=0, max=65535)
    registry: str = setting(".models/registry.yaml", "model registry file (model id -> directory)")
    models: list[str] = setting([], "model ids to load at start-up (empty: every registry entry)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (auto: CUDA when present)")
    dtype: str = setting("auto", "model dtype (auto: float16 on CUDA, float32 on CPU)",
                         choices=("auto", "float32", "float16", "bfloat16"))
    torch_threads: int = setting(0, "intra-op CPU threads for torch (0: torch's default)", min=0)
    keep_freed_memory: bool = setting(True, "keep freed tensor buffers in the heap (glibc): faster hops, more RSS")
    max_message_mb: int = setting(256, "largest gRPC message accepted or sent, MiB", min=4, max=2047)
    grace_period_s: float = setting(30.0, "SIGTERM drain time for in-flight calls", min=0)
    max_concurrency: int = setting(1, "requests computing at once; more wait in the queue", min=1)
    max_queue: int = setting(64, "requests allowed to wait; beyond it RESOURCE_EXHAUSTED", min=0)
    log_level: str = setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    max_connection_age_s: float = setting(
        300.0, "close client connections after this long (0: never) so clients re-resolve DNS and new "
        "replicas behind a headless Service get traffic; in-flight calls get grace_period_s", min=0)
    health_port: int = setting(0, "extra plaintext port serving only grpc.health.v1 (for kubelet gRPC probes, "
                                  "which cannot speak TLS); 0: none", min=0, max=65535)
    tls_cert_file: str = setting("", "PEM certificate chain: serve TLS (and present it as the client identity)")
    tls_key_file: str = setting("", "PEM private key for tls_cert_file")
    tls_ca_file: str = setting("", "PEM CA bundle: require client certificates it signed (mTLS) and verify servers")
    metrics_port: int = setting(0, "Prometheus metrics HTTP port (0: no metrics endpoint)", min=0, max=65535)
    variant: str = setting("stable", "which replica set this process belongs to (reported per call)",
                           choices=("stable", "canary"))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, kind: Any, raw: Any, source: str) -> Any:
    origin = typing.get_origin(kind)
    try:
        if origin is list:
            if isinstance(raw, str):
                return [item.strip() for item in raw.split(",") if item.strip()]
            if isinstance(raw, list):
                return [str(item) for item in raw]
            raise TypeError
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind is str:
            if isinstance(raw, (dict, list)):
                raise TypeError
            return str(raw)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported setting type {kind}")
    type_name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{name}: expected {type_name}, got {raw!r} (from {source})")


def _check_bounds(field: dataclasses.Field, value: Any, source: str) -> None:
    meta = field.metadata
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"{field.name}: must be in [{lo}, {hi}], got {value!r} (from {source})")
    if choices and value not in choices:
        raise ConfigError(f"{field.name}: must be one of {', '.join(map(str, choices))}, "
                          f"got {value!r} (from {source})")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def build_parser(cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    parser.add_argument("--config", help=f"YAML settings file (or ${CONFIG_FILE_ENV})")
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, dest=field.name, default=None, help=field.metadata.get("help"))
    return parser


def load_config(cls: type[T], argv: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None, prog: str | None = None) -> T:
    """Builds `cls` from defaults < YAML file < DIFFMESH_* environment < command-line flags."""
    environ = os.environ if environ is None else environ
    args = build_parser(cls, prog).parse_args(list(argv) if argv is not None else [])
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, tuple[Any, str]] = {}

    file_path = args.config or environ.get(CONFIG_FILE_ENV)
    if file_path:
        for key, raw in _read_file(Path(file_path)).items():
            name = str(key).replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(fields))
                raise ConfigError(f"config file {file_path}: unknown setting {key!r} (known: {known})")
            values[name] = (raw, f"file {file_path}")
    env_names = {ENV_PREFIX + name.upper(): name for name in fields}
    for env_name, raw in environ.items():
        if not env_name.startswith(ENV_PREFIX) or env_name == CONFIG_FILE_ENV:
            continue
        if env_name not in env_names:
            # A typo (DIFFMESH_MAX_QEUE) or a setting meant for another stage would otherwise be
            # ignored silently: the same rule as an unknown key in the YAML file.
            known = ", ".join(sorted(env_names))
            raise ConfigError(f"env {env_name}: unknown setting for this service (known: {known})")
        values[env_names[env_name]] = (raw, f"env {env_name}")
    for name in fields:
        raw = getattr(args, name)
        if raw is not None:
            values[name] = (raw, "flag --" + name.replace("_", "-"))

    kwargs = {}
    for name, (raw, source) in values.items():
        value = _coerce(name, hints[name], raw, source)
        _check_bounds(fields[name], value, source)
        kwargs[name] = value
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config
