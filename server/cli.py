"""The `keyserve` command line: `serve` (the OpenAI-compatible server) and `generate`."""

import argparse
import logging
import os
import sys

from engine.config import EngineConfig
from server.config import LOG_LEVELS, ServeConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded model's name for clients
# With no config file, the server runs the project's point: Keyformer eviction.
SERVE_DEFAULTS = {"kv_policy": "keyformer", "kv_ratio": 0.5}


def engine_config(
    config_path: str | None, overrides: dict, defaults: dict | None = None
) -> EngineConfig:
    """Flags win over the config file; with no file, `defaults` win over EngineConfig's."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config_path:
        return EngineConfig.from_yaml(config_path, **overrides)
    return EngineConfig(**{**(defaults or {}), **overrides})


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    config = engine_config(
        args.config, {"model": args.model, "dtype": args.dtype, "device": args.device}
    )
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
    """The engine config `keyserve serve` runs with: flags, then --config, then SERVE_DEFAULTS."""
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
        "kv_policy": args.kv_policy,
        "kv_ratio": args.kv_ratio,
    }
    return engine_config(args.config, overrides, SERVE_DEFAULTS)


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


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine import LLMEngine
    from server.app import ServerSettings, create_app
    from server.drain import DrainingServer

    serve = server_config(args)
    logging.basicConfig(level=serve.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = serve_config(args)
    engine = LLMEngine(config)
    settings = ServerSettings(
        model_name=serve.served_model_name or config.model or DEFAULT_MODEL_NAME,
        model_root=str(engine.model_path),
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
        f"kv_ratio={config.kv_ratio}) on http://{serve.host}:{serve.port}",
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


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/completions and /v1/chat/completions. With no flags: the "
        "embedded SmolLM2-135M-Instruct, kv_policy keyformer at kv_ratio 0.5, on "
        "127.0.0.1:8000. Flags override the --config file, which overrides those defaults.",
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
        help="require 'Authorization: Bearer KEY' (default: $KEYSERVE_API_KEY; unset: no auth)",
    )
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--device", help="auto, cpu or cuda[:N]")
    pool = serve.add_mutually_exclusive_group()
    pool.add_argument("--kv-cache-bytes", help="KV pool size, e.g. 512MiB, 2GB")
    pool.add_argument("--kv-cache-blocks", type=_positive_int, help="KV pool size in blocks")
    serve.add_argument("--block-size", type=_positive_int)
    serve.add_argument("--max-model-len", type=_positive_int)
    serve.add_argument("--max-num-seqs", type=_positive_int)
    serve.add_argument("--max-num-batched-tokens", type=_positive_int)
    serve.add_argument("--kv-policy", choices=["full", "window", "streaming", "h2o", "keyformer"])
    serve.add_argument("--kv-ratio", type=float, help="KV budget as a fraction of the prompt")
    serve.add_argument(
        "--max-waiting",
        type=_positive_int,
        help="requests allowed to wait for admission; past it, 503 (default: no limit)",
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
    serve.add_argument("--log-level", choices=LOG_LEVELS)
    serve.set_defaults(func=_serve)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="print a completion of one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="model folder or .gguf file (default: SmolLM2-135M)")
    gen.add_argument("--config", help="YAML config (see configs/default.yaml)")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
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
