"""The `keyserve` command line: `serve` (the OpenAI-compatible server) and `generate`."""

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from engine.config import EngineConfig
from kv_manager.policies import KV_POLICY_FIELDS, KV_SETTINGS, KVSetting
from kv_manager.policies.settings import check_one_budget_rule
from server.config import LOG_LEVELS, ServeConfig
from server.limits import DEFAULT_MAX_WAITING

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded model's name for clients
_KV_DEFAULTS = {s.name: s.default for s in KV_SETTINGS}
DTYPES = ["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = (
    "weights, activations and KV cache (default auto: bfloat16 on CUDA and on CPUs with "
    "AVX-512-BF16 or AMX, float32 on other CPUs)"
)


def engine_config(config_path: str | None, overrides: dict) -> EngineConfig:
    """Flags win over the config file, which wins over EngineConfig's defaults."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not config_path:
        return EngineConfig(**overrides)
    config = EngineConfig.from_yaml(config_path, **overrides)
    if "kv_ratio" in overrides and "kv_target_mass" not in overrides:
        config.kv_target_mass = None  # a --kv-ratio flag wins over the file's target
    return config


def kv_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The --kv-* flags as EngineConfig fields (None where not given); a
    ValueError for --kv-ratio with --kv-target-mass (one budget rule)."""
    given = {name: getattr(args, name) for name in KV_POLICY_FIELDS}
    check_one_budget_rule(given)
    return given


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    overrides = {"model": args.model, "dtype": args.dtype, "device": args.device}
    config = engine_config(args.config, {**overrides, **kv_flag_values(args)})
    llm = LLM(**vars(config))
    prompt = args.prompt
    if args.chat:
        prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    out = llm.generate([prompt], params)[0].outputs[0]
    print(out.text)
    return 0


def serve_config(args: argparse.Namespace) -> EngineConfig:
    """The engine config `keyserve serve` runs with: flags, then --config, then EngineConfig's
    defaults (whose KV policy is KVPolicySettings's: keyformer at kv_ratio 0.5)."""
    overrides = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "kv_cache_bytes": args.kv_cache_bytes,
        "kv_cache_blocks": args.kv_cache_blocks,
        "block_size": args.block_size,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enforce_eager": args.enforce_eager or None,
        **kv_flag_values(args),
    }
    return engine_config(args.config, overrides)


def server_config(args: argparse.Namespace) -> ServeConfig:
    """The server settings `keyserve serve` runs with: flags, then --config, then defaults."""
    return ServeConfig.from_yaml(
        args.config,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        max_request_bytes=args.max_request_bytes,
        max_waiting=args.max_waiting,
        allowed_origins=args.allowed_origins,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
    )


def _budget_rule(config: EngineConfig) -> str:
    if config.kv_target_mass is not None:
        return f"kv_target_mass={config.kv_target_mass}"
    return f"kv_ratio={config.kv_ratio}"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine import LLMEngine
    from server.app import ServerSettings, create_app
    from server.drain import DrainingServer
    from server.errors import check_api_key_setting

    check_api_key_setting(args.api_key)  # before the minutes a model may take to load
    serve = server_config(args)
    logging.basicConfig(level=serve.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = serve_config(args)
    engine = LLMEngine(config)
    settings = ServerSettings(
        model_name=serve.served_model_name or config.model or DEFAULT_MODEL_NAME,
        api_key=args.api_key,
        max_request_bytes=serve.max_request_bytes,
        allowed_origins=serve.allowed_origins or None,
    )
    app = create_app(engine, settings, max_waiting=serve.max_waiting)
    uv_config = uvicorn.Config(
        app,
        host=serve.host,
        port=serve.port,
        log_level=serve.log_level,
        # After the drain, a few seconds for the last responses to flush.
        timeout_graceful_shutdown=5,
    )
    print(
        f"keyserve: serving {settings.model_name} (kv_policy={config.kv_policy}, "
        f"{_budget_rule(config)}) on http://{serve.host}:{serve.port}",
        file=sys.stderr,
    )
    server = DrainingServer(uv_config, app.state.engine, serve.drain_timeout)
    server.run()
    return server.exit_code


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _kv_flag_type(setting: KVSetting) -> Callable[[str], Any]:
    """Read a --kv-* flag as its setting's type and check it by the setting's
    own rule, so a bad value stops the command with the same message a bad
    config key or request field gets."""

    def parse(text: str) -> Any:
        value = setting.kind(text)  # a ValueError: argparse's "invalid float value: 'x'"
        try:
            setting.check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        return value

    parse.__name__ = setting.kind.__name__
    return parse


def _add_kv_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per KV setting (--kv-policy, --kv-ratio, ...), generated from
    KVPolicySettings: name, type, valid values and help. No argparse default:
    an unset flag leaves the value to --config, then to KVPolicySettings."""
    group = parser.add_argument_group(
        "default KV policy",
        "The policy of requests that set none (each request may override each field). "
        "A flag wins over the --config file's key, which wins over the default shown.",
    )
    for s in KV_SETTINGS:
        rule = "" if s.limits.choices else f"; {s.limits.rule()}"
        default = "none" if s.default is None else s.default
        group.add_argument(
            "--" + s.name.replace("_", "-"),
            type=_kv_flag_type(s),
            choices=s.limits.choices,
            # argparse %-formats help text.
            help=f"{s.help}{rule} (default: {default})".replace("%", "%%"),
        )


def _add_limit_flags(serve: argparse.ArgumentParser) -> None:
    """What clients may ask of the server: queue, body size, origins, drain time."""
    serve.add_argument(
        "--max-waiting",
        type=_positive_int,
        help="sequences (prompts x n) allowed to wait for admission; past it, 503 "
        f"(default {DEFAULT_MAX_WAITING})",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        help="larger request bodies get 413 (default 1 MiB)",
    )
    serve.add_argument(
        "--allowed-origins",
        nargs="+",
        metavar="ORIGIN",
        help="origins allowed cross-origin requests (CORS), e.g. https://app.example; "
        "default: none, no CORS headers",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        help="on SIGTERM, seconds to let running requests finish (default 30)",
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/completions and /v1/chat/completions. With no flags: the "
        f"embedded SmolLM2-135M-Instruct, kv_policy {_KV_DEFAULTS['kv_policy']} at kv_ratio "
        f"{_KV_DEFAULTS['kv_ratio']}, on 127.0.0.1:8000. Flags override the --config file, "
        "which overrides those defaults.",
    )
    serve.add_argument("--config", help="YAML config (see configs/default.yaml)")
    serve.add_argument("--model", help="model folder or .gguf file (default: SmolLM2-135M)")
    serve.add_argument("--served-model-name", help="the model name clients send")
    # Flags with no default here take theirs from --config, then from ServeConfig.
    serve.add_argument("--host", help="address to bind (default 127.0.0.1: loopback only)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("KEYSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $KEYSERVE_API_KEY; unset: no auth; "
        "empty: refused)",
    )
    serve.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)
    serve.add_argument("--device", help="auto, cpu or cuda[:N]")
    pool = serve.add_mutually_exclusive_group()
    pool.add_argument("--kv-cache-bytes", help="KV pool size, e.g. 512MiB, 2GB")
    pool.add_argument("--kv-cache-blocks", type=_positive_int, help="KV pool size in blocks")
    serve.add_argument("--block-size", type=_positive_int)
    serve.add_argument("--max-model-len", type=_positive_int)
    serve.add_argument("--max-num-seqs", type=_positive_int)
    serve.add_argument("--max-num-batched-tokens", type=_positive_int)
    serve.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode steps eagerly, without CUDA graphs",
    )
    _add_limit_flags(serve)
    serve.add_argument("--log-level", choices=LOG_LEVELS)
    _add_kv_flags(serve)
    serve.set_defaults(func=_serve)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="print a completion of one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="model folder or .gguf file (default: SmolLM2-135M)")
    gen.add_argument("--config", help="YAML config (see configs/default.yaml)")
    gen.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)
    gen.add_argument("--device")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument(
        "--no-chat",
        dest="chat",
        action="store_false",
        help="complete the raw text instead of wrapping it in the chat template",
    )
    _add_kv_flags(gen)
    gen.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"keyserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
