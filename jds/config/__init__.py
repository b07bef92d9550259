"""The YAML configuration of a jds deployment, validated with pydantic.

Unknown keys and bad values fail at load time with the offending key path in the message, so a
typo in a sharding experiment is caught before any device is touched. Relative paths are resolved
against the config file's folder; ``package://NAME/FILE`` points into an installed Python package
(how the default SmolLM2 weights are found) without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, field_validator, model_validator

from jds.config.placement import Placement
from jds.model.architecture import Architecture

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "smollm2-135m.yaml"
PACKAGE_SCHEME = "package://"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says which key and why."""


class ModelSection(BaseModel):
    """Which weights, tokenizer and numeric type to serve."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(default="model", min_length=1)
    checkpoint: str | None = Field(
        default=None, description="GGUF file, Hugging Face directory, jds checkpoint, or package://; none = random"
    )
    format: Literal["auto", "gguf", "hf", "jds"] = "auto"
    architecture: Architecture | None = None
    tokenizer: str | None = Field(
        default="checkpoint", description="'checkpoint', a tokenizer.json / GGUF path, or null for token ids only"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    quantization: Literal["none", "int8"] = Field(
        default="none",
        description="int8: projection and embedding weights stored as int8, one scale per output channel",
    )
    seed: int = 0
    max_seq_len: PositiveInt | None = Field(default=None, description="longest prompt + output; default 2048")

    @model_validator(mode="after")
    def _needs_weights_or_shapes(self) -> ModelSection:
        if self.checkpoint is None and self.architecture is None:
            raise ValueError("give model.checkpoint, or model.architecture for random weights")
        if self.checkpoint is None and self.tokenizer == "checkpoint":
            object.__setattr__(self, "tokenizer", None)
        return self


class TLSSection(BaseModel):
    """A certificate and its private key (PEM files), for every port the server listens on."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cert: str = Field(min_length=1, description="PEM certificate (chain) the server presents")
    key: str = Field(min_length=1, description="PEM private key of that certificate")


class ServerSection(BaseModel):
    """How ``python -m jds.server`` listens; command-line flags override these."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535, description="0 picks a free port")
    http_port: int | None = Field(default=None, ge=0, le=65535, description="OpenAI-compatible HTTP API; null disables")
    metrics_port: int | None = Field(default=9090, ge=0, le=65535, description="Prometheus /metrics; null disables")
    max_waiting: PositiveInt = Field(default=256, description="requests waiting for prefill; more get RESOURCE_EXHAUSTED")
    drain_seconds: float = Field(default=30.0, ge=0, allow_inf_nan=False, description="on SIGTERM, how long in-flight requests may finish")
    warmup: bool = Field(default=True, description="compile every program shape before reporting SERVING")
    compile_cache: str | None = Field(
        default="~/.cache/jds/compiled", description="directory of compiled programs kept across restarts; null compiles afresh"
    )
    max_request_bytes: PositiveInt = Field(
        default=4 * 1024 * 1024, le=2**31 - 1, description="largest request body (HTTP: 413 beyond it) or message (gRPC: RESOURCE_EXHAUSTED)"
    )
    api_keys: list[str] = Field(
        default_factory=list, description="clients must send one (Bearer); also --api-key and $JDS_API_KEY; empty: open"
    )
    keys_guard_health: bool = Field(default=False, description="health checks, reflection and metrics need a key too")
    cors_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        description="origins whose web pages may call the HTTP API (CORS; vLLM's --allowed-origins default); empty: none",
    )
    tls: TLSSection | None = Field(default=None, description="serve gRPC, HTTP and metrics over TLS")

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            problem = api_key_problem(key)
            if problem:
                raise ValueError(f"[{i}] {problem}")
        return keys


def api_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key, or None. An empty key would leave the server open (a
    ``--api-key "$KEY"`` with KEY unset), and one with surrounding spaces could never match:
    clients' keys are read stripped."""
    if not key:
        return "an API key must not be empty"
    if key != key.strip():
        return "an API key must not start or end with whitespace"
    return None


class ClusterSection(BaseModel):
    """Roles as separate processes (``--role router|prefill|decode``, or ``python -m jds.launch``):
    where each instance of the placement listens, and how KV moves between them."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prefill: list[str] = Field(default_factory=list, description="host:port of each placement.prefill instance, in order")
    decode: list[str] = Field(default_factory=list, description="host:port of each placement.decode instance, in order")
    coordinators: dict[str, str] = Field(
        default_factory=dict, description="host:port of the jax.distributed coordinator of each multi-process instance, e.g. prefill1"
    )
    lease_seconds: float = Field(default=30.0, gt=0, description="offered KV nobody pulls by then is released")
    pull_timeout_seconds: float = Field(default=30.0, gt=0, description="a KV pull not done by then fails")
    on_pull_failure: Literal["fail", "reprefill"] = Field(default="fail", description="what a failed KV pull does to its request")
    policy: Literal["cache_aware", "least_loaded", "round_robin"] = Field(
        default="cache_aware",
        description="how the router picks a prefill instance: where the prompt's leading pages were sent before, else the least "
        "loaded / the least loaded / in turn (decode instances: the most room, or in turn)",
    )
    cache_balance: int = Field(
        default=4, ge=0, description="cache_aware sends a prompt elsewhere once its cached instance has more than this many requests in flight beyond the least loaded"
    )
    health_seconds: float = Field(default=0.5, gt=0, description="how often the router checks every instance")
    instance_wait_seconds: float = Field(default=30.0, gt=0, description="a request fails if no instance of a role serves by then")
    transfer_host: str = Field(default="127.0.0.1", description="address the KV transfer servers listen on")


class Config(BaseModel):
    """A whole deployment file."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: ModelSection
    placement: Placement = Field(default_factory=Placement)
    server: ServerSection = Field(default_factory=ServerSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    _base_dir: Path = PrivateAttr(default=Path("."))

    def resolve_path(self, value: str) -> Path:
        """A config path made absolute: package:// inside an installed package, else from base_dir."""
        if value.startswith(PACKAGE_SCHEME):
            package, _, rest = value[len(PACKAGE_SCHEME) :].partition("/")
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ConfigError(f"package {package!r} named in {value!r} is not installed")
            return Path(spec.submodule_search_locations[0]) / rest
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self._base_dir / path


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: object, base_dir: Path = Path("."), source: str = "<dict>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    config._base_dir = base_dir
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML as the spec has it: a key given twice in one mapping is an error, not a silent
    overwrite (``server:`` twice would drop the first section's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate a YAML config; ``None`` means the default SmolLM2 config."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    return parse_config(data, path.resolve().parent, str(path))
