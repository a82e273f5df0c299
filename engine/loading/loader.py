"""Find a model folder and load its config and safetensors weights into our model.

Weights load only from safetensors (never pickle). A GGUF file is converted
once to a cached safetensors folder (`engine.loading.gguf_convert`).
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.kernels.linear import pack_linears
from engine.models import CausalLM, model_class_for


def resolve_model_path(model: str | None) -> Path:
    """A loadable local folder for `model`: None (the embedded default), a
    folder with config.json, or a .gguf file. Never downloads."""
    if model is None:
        from engine.loading.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from engine.loading.gguf_convert import convert_cached

        return convert_cached(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model {model!r} is neither a folder with config.json nor a .gguf file "
        "(models load from local paths only; there are no hub downloads)"
    )


def load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def iter_safetensors(folder: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = f.get_tensor(name)
                yield name, t.to(dtype) if t.is_floating_point() else t


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config: Any, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """An uninitialised-weights model of the config's family.

    Built under the target dtype rather than converted after, so the float32
    tables (RoPE, ALiBi slopes) stay float32.
    """
    cls = model_class_for(config)
    with _default_dtype(dtype), torch.device(device):
        model = cls(config)
    return model.eval()


def load_model(folder: Path, config: Any, dtype: torch.dtype, device: torch.device) -> CausalLM:
    model = build_model(config, dtype, device)
    model.load_weights(iter_safetensors(folder, dtype))
    model.merge_projections()  # fewer, wider matmuls: cheaper per step
    pack_linears(model)  # CPU float32: oneDNN's packed weights, faster than nn.Linear
    return model
