"""The HTTP front end's settings: the `server:` section of a YAML config.

The engine's settings live in engine.config.EngineConfig (the `engine:`
section); these are the ones only the server has: where it listens and the
limits it puts on clients. The API key is deliberately not among them: a key
belongs in the environment ($KEYSERVE_API_KEY) or a flag, not in a config file
that gets committed and mounted.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import from_section
from server.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    served_model_name: str | None = None  # None: the model's own name
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413
    max_waiting: int = DEFAULT_MAX_WAITING  # sequences waiting for admission; past it 503
    allowed_origins: list[str] | None = field(default=None)  # CORS; None: no CORS headers
    drain_timeout: float = 30.0  # seconds running requests get on SIGTERM
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 1:
            raise ValueError(f"max_waiting must be a positive integer, got {self.max_waiting!r}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be at least 0, got {self.drain_timeout}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides: Any) -> "ServeConfig":
        """The `server:` section of `path` (if any); `overrides` that are not None win."""
        section: dict[str, Any] = {}
        if path is not None:
            data = yaml.safe_load(Path(path).read_text()) or {}
            section = dict(data.get("server") or {})
        return from_section(cls, section, f"server config keys in {path}", overrides)
