"""`lorafleet` command line: `infer` (terminal chat), `deploy` (the Serve app), with ms-swift's flags."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from serve_app.errors import LorafleetError


def str2bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "y"):
        return True
    if text.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the model and engine, shared by every subcommand."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_type", default=None, help="a model type from the table (default: tiny-chat)")
    group.add_argument("--model_id_or_path", default=None, help="a local checkpoint dir (or hub id)")
    group.add_argument("--ckpt_dir", default=None, help="a checkpoint dir, or a PEFT adapter dir (served on its base)")
    group.add_argument("--template_type", default=None, help="override the template (e.g. jinja)")
    group.add_argument("--infer_backend", choices=["vllm", "pt"], default="vllm")
    group.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    group.add_argument("--tensor_parallel_size", type=int, default=1)
    group.add_argument("--max_model_len", type=int, default=None)
    group.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    group.add_argument("--enforce_eager", type=str2bool, default=False)
    group.add_argument("--vllm_enable_lora", type=str2bool, default=False)
    group.add_argument("--max_loras", type=int, default=1)
    group.add_argument("--max_lora_rank", type=int, default=16)
    group.add_argument("--lora_modules", nargs="*", default=[], metavar="NAME=PATH")


@dataclass(frozen=True)
class ModelChoice:
    """What the model flags resolve to: the base checkpoint and the adapters to serve on it."""

    model_type: str | None
    model_id_or_path: str | None
    adapters: dict[str, str]
    enable_lora: bool


def resolve_model_choice(args: argparse.Namespace) -> ModelChoice:
    """Apply ms-swift's rules: `--ckpt_dir` of an adapter means its base plus `default-lora`."""
    from lora_registry.adapter_files import inspect_adapter, is_peft_adapter
    from serve_app.model_types import MODELS

    adapters = parse_lora_modules(args.lora_modules)
    model_type, path = args.model_type, args.model_id_or_path
    if args.ckpt_dir and is_peft_adapter(args.ckpt_dir):
        info = inspect_adapter(args.ckpt_dir)
        adapters = {"default-lora": info.path, **adapters}
        if model_type is None and path is None:
            base = info.base_model_name_or_path
            model_type, path = (base, None) if base in MODELS else (None, base)
    elif args.ckpt_dir:
        path = args.ckpt_dir
    if model_type is None and path is None:
        model_type = "tiny-chat"
    return ModelChoice(model_type, path, adapters, enable_lora=args.vllm_enable_lora or bool(adapters))


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora_modules takes NAME=PATH pairs, got '{item}' (e.g. xiao-huang=/path/to/adapter)")
        adapters[name] = path
    return adapters


def cmd_infer(args: argparse.Namespace) -> None:
    from serve_app.chat_session import build_chat_session

    session = build_chat_session(args, resolve_model_choice(args))
    session.repl().run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="chat with a model in the terminal")
    add_model_args(infer)
    infer.add_argument("--system", default=None, help="system prompt (default: the template's)")
    infer.add_argument("--max_new_tokens", type=int, default=None)
    infer.add_argument("--temperature", type=float, default=None)
    infer.add_argument("--top_p", type=float, default=None)
    infer.add_argument("--top_k", type=int, default=None)
    infer.add_argument("--repetition_penalty", type=float, default=None)
    infer.add_argument("--seed", type=int, default=None)
    infer.set_defaults(func=cmd_infer)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LorafleetError as e:
        print(f"lorafleet: {e.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

