"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on CI; pinning the count keeps float reductions stable run to run.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session")
def live_server():
    """One real server (SmolLM2, uvicorn on loopback) shared by the server tests.

    `.engine` is the LLMEngine behind it (read-only from tests: its thread owns
    it), `.app` the FastAPI app.
    """
    from live_server import MODEL_NAME, LiveServer, smollm2_engine

    from server import ServerSettings, create_app

    engine = smollm2_engine()
    app = create_app(engine, ServerSettings(model_name=MODEL_NAME))
    with LiveServer(app) as server:
        server.engine = engine
        yield server
