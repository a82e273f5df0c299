"""The OpenAI-compatible HTTP front end: FastAPI app, protocol models,
streaming, auth, Prometheus metrics, and the `keyserve` CLI that starts it."""

from server.app import ServerSettings, build_app, create_app

__all__ = ["ServerSettings", "build_app", "create_app"]
