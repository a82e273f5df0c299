"""The `keyserve` command line."""

import argparse
import sys

from engine.config import EngineConfig


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    overrides = {"model": args.model, "dtype": args.dtype, "device": args.device}
    if args.config:
        config = EngineConfig.from_yaml(args.config, **overrides)
    else:
        config = EngineConfig(**{k: v for k, v in overrides.items() if v is not None})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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
