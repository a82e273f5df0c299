"""Model families and the registry from config.json's architecture to a class."""

import importlib
from typing import Any

from engine.models.base import CausalLM

# architecture name in config.json -> (module under engine.models, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
}


class UnsupportedArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class_for(config: Any) -> type[CausalLM]:
    """The family class for a transformers config, or a clear error."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in _REGISTRY:
            module_name, class_name = _REGISTRY[arch]
            module = importlib.import_module(f"engine.models.{module_name}")
            return getattr(module, class_name)
    raise UnsupportedArchitectureError(
        f"unsupported model architecture {archs or '(none in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )


__all__ = ["CausalLM", "UnsupportedArchitectureError", "model_class_for", "supported_architectures"]
