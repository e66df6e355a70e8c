"""`lorafleet` command line: `infer` (terminal chat), `deploy` (the Serve app), with ms-swift's flags."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from serve_app.errors import LorafleetError
from serve_app.swift_checkpoint import ModelChoice, resolve_model_choice


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
    group.add_argument(
        "--system", default=None, help="system prompt for chats that send none (default: the template's)"
    )
    group.add_argument(
        "--merge_lora",
        type=str2bool,
        default=False,
        help="merge the --ckpt_dir adapter into its base first and serve the result (kept in CKPT_DIR-merged)",
    )
    group.add_argument("--infer_backend", choices=["vllm", "pt"], default="vllm")
    group.add_argument("--lora_modules", nargs="*", default=[], metavar="NAME=PATH")
    add_engine_args(parser.add_argument_group("engine (serve_config.yaml's engine:)"))


# Flag names that differ from the engine option's: ms-swift's name for enable_lora, and infer's
# --seed is the sampling seed (as in ms-swift).
ENGINE_FLAG_NAMES = {"enable_lora": "vllm_enable_lora", "seed": "engine_seed"}


def engine_flag(name: str) -> str:
    return ENGINE_FLAG_NAMES.get(name, name)


def add_engine_args(group) -> None:
    """One flag per EngineOptions field, with its type, description and default; a flag not given
    stays None so that EngineOptions' own default applies."""
    from serve_app.config import EngineOptions

    for name, field in EngineOptions.model_fields.items():
        default = field.get_default(call_default_factory=True)
        group.add_argument(
            f"--{engine_flag(name)}",
            type=_flag_type(field.annotation),
            default=None,
            help=(field.description + ("" if default in (None, {}) else f" (default: {default})")).replace("%", "%%"),
        )


def _flag_type(annotation):
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [typing.get_origin(a) or a for a in (typing.get_args(annotation) if union else (annotation,))]
    kinds = [k for k in kinds if k is not type(None)]
    if typing.Literal in kinds and list in kinds:  # a word or names, e.g. --lora_target_modules q_proj,v_proj
        return _word_or_names
    if typing.Literal in kinds:  # a number or a word, e.g. --max_loras auto
        return _number_or_word
    return {bool: str2bool, dict: json.loads}.get(kinds[0], kinds[0])


def _number_or_word(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _word_or_names(text: str) -> str | list[str]:
    return text if text in ("auto", "all") else [name.strip() for name in text.split(",") if name.strip()]


def engine_options_from_args(args: argparse.Namespace, choice: ModelChoice):
    """The EngineOptions these flags give (adapters turn LoRA on)."""
    from serve_app.config import EngineOptions

    given = {name: getattr(args, engine_flag(name)) for name in EngineOptions.model_fields}
    given = {name: value for name, value in given.items() if value is not None}
    if choice.adapters:
        given["enable_lora"] = True
    return EngineOptions(**given)


def cmd_infer(args: argparse.Namespace) -> None:
    from serve_app.batch_infer import dataset_from_ckpt, read_records, run_batch
    from serve_app.chat_session import build_chat_session

    dataset = args.dataset or (dataset_from_ckpt(args.ckpt_dir) if args.load_dataset_config else None)
    records = read_records(dataset) if dataset else None  # before the engine starts
    session = build_chat_session(args, resolve_model_choice(args))
    if dataset:
        run_batch(session, dataset, records, args.result_path)
    else:
        session.repl().run()


def config_from_args(args: argparse.Namespace):
    """The AppConfig that `serve_config.yaml` would hold for these flags."""
    from serve_app.config import (
        AppConfig,
        AutoscalingOptions,
        DeploymentOptions,
        IngressConfig,
        ModelConfig,
        RegistryConfig,
    )

    choice = resolve_model_choice(args)
    if args.num_replicas is not None:
        deployment = DeploymentOptions(num_replicas=args.num_replicas)
    else:
        deployment = DeploymentOptions(
            autoscaling=AutoscalingOptions(min_replicas=args.min_replicas, max_replicas=args.max_replicas)
        )
    engine = engine_options_from_args(args, choice)
    model = ModelConfig(
        name=args.served_model_name,
        model_type=choice.model_type,
        model_id_or_path=choice.model_id_or_path,
        template_type=choice.template_type,
        default_system=choice.system,
        infer_backend=args.infer_backend,
        engine=engine,
        lora_modules=choice.adapters,
        deployment=deployment,
    )
    registry = RegistryConfig(
        allowed_roots=args.adapter_roots,
        database_url=args.database_url,
        **({"state_dir": args.state_dir} if args.state_dir else {}),
    )
    ingress = IngressConfig(api_key=args.api_key, admin_api_key=args.admin_api_key)
    return AppConfig(models=[model], ingress=ingress, registry=registry)


def cmd_deploy(args: argparse.Namespace) -> None:
    from serve_app.launcher import run_app

    run_app(config_from_args(args), host=args.host, port=args.port)


def cmd_app_ui(args: argparse.Namespace) -> None:
    from serve_app.launcher import run_app

    run_app(config_from_args(args), host=args.host, port=args.port, page="/ui")


def cmd_export(args: argparse.Namespace) -> None:
    from serve_app import exporter

    if args.quant_bits:
        return export_quantized(args)
    if not args.ckpt_dir:
        raise SystemExit(
            "lorafleet: export needs --ckpt_dir (a PEFT adapter folder, or a Qwen(1) checkpoint with --to_qwen2), "
            "or --quant_bits with --model_type."
        )
    if not Path(args.ckpt_dir).is_dir():
        raise SystemExit(f"lorafleet: --ckpt_dir '{args.ckpt_dir}' is not a folder (does it exist?).")
    if args.to_qwen2:
        from serve_app.qwen1_convert import convert

        out = args.output_dir or f"{args.ckpt_dir.rstrip('/')}-qwen2"
        print(f"[export] done: {convert(args.ckpt_dir, out)} (Qwen2 layout)", flush=True)
    elif args.merge_lora:
        from serve_app.swift_checkpoint import peft_form

        output_dir = args.output_dir or f"{args.ckpt_dir.rstrip('/')}-merged"
        exporter.merge_lora(
            peft_form(args.ckpt_dir), output_dir, args.model_type, args.model_id_or_path, args.trust_remote_code
        )
    elif args.to_peft_format:
        exporter.copy_peft(args.ckpt_dir, args.output_dir)
    else:
        raise SystemExit("lorafleet: say what to export: --merge_lora true, --to_peft_format true or --to_qwen2 true.")


def export_quantized(args: argparse.Namespace) -> None:
    """`--quant_bits N`: quantize --model_type / --model_id_or_path, a full --ckpt_dir, or an adapter
    --ckpt_dir merged first (--merge_lora true), into `<source>-<method>-int<N>` as ms-swift names it."""
    from lora_registry.adapter_files import is_peft_adapter
    from serve_app import exporter, quantize
    from serve_app.model_types import resolve_model_dir, trusts_remote_code
    from serve_app.swift_checkpoint import merged_checkpoint, peft_form

    method = quantize.check_request(args.quant_bits, args.quant_method)  # before any work
    remote_code = trusts_remote_code(args.model_type, args.trust_remote_code)
    adapter = args.ckpt_dir and (is_peft_adapter(args.ckpt_dir) or exporter.swift_lora_dir(args.ckpt_dir))
    if adapter and not args.merge_lora:
        raise SystemExit("lorafleet: --ckpt_dir is a LoRA adapter; quantize it merged: add --merge_lora true.")
    if adapter:
        ckpt = peft_form(args.ckpt_dir)
        source = merged_checkpoint(ckpt, args.model_type, args.model_id_or_path, args.trust_remote_code, args.ckpt_dir)
        stem = args.ckpt_dir
    elif args.ckpt_dir:
        source, stem = resolve_model_dir(None, args.ckpt_dir), args.ckpt_dir
    else:
        source = resolve_model_dir(args.model_type or "tiny-chat", args.model_id_or_path)
        stem = args.model_type or Path(args.model_id_or_path).name  # in the current folder, as ms-swift does
    out = Path(args.output_dir) if args.output_dir else quantize.output_dir(stem, args.quant_bits, method)
    quantize.quantize(source, out, args.quant_bits, method, args.dataset, remote_code)
    print(f"[export] done: {out} ({method} int{args.quant_bits}, compressed-tensors)", flush=True)


def cmd_keys(args: argparse.Namespace) -> None:
    from serve_app.admin_client import AdminClient

    client = AdminClient(args.url, args.admin_api_key)
    try:
        if args.action == "create":
            spec = {
                "tenant": args.tenant,
                "models": args.models,
                "can_register": args.can_register,
                "requests_per_minute": args.requests_per_minute,
                "tokens_per_minute": args.tokens_per_minute,
            }
            key = client.create_key(args.name, **spec)
            print(f"created key '{key['name']}' of tenant '{key['tenant']}'; its secret (shown only now):")
            print(key["key"])
        elif args.action == "revoke":
            key = client.revoke_key(args.name)
            print(f"revoked key '{key['name']}' ({key['key_hint']})")
        else:
            _print_keys(client.list_keys())
    finally:
        client.close()


def _print_keys(keys: list[dict]) -> None:
    columns = ("name", "tenant", "key_hint", "models", "can_register", "requests_per_minute", "tokens_per_minute")
    rows = [[str(k[c] if c != "models" else ",".join(k[c]) or "(base models)") for c in columns] for k in keys]
    rows = [[*row, "revoked" if k["revoked_at"] else "active"] for row, k in zip(rows, keys, strict=True)]
    header = [*columns, "state"]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def add_keys_parser(sub) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke tenant API keys of a running app")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("--url", default="http://127.0.0.1:8000", help="the app's address (default: %(default)s)")
    keys.add_argument("--admin_api_key", default=None, help="the app's admin key (default: $LORAFLEET_ADMIN_API_KEY)")
    keys.add_argument("--name", default=None, help="the key's name (create, revoke)")
    keys.add_argument("--tenant", default=None, help="its tenant (default: the name); adapters `TENANT:*` are its own")
    keys.add_argument(
        "--models", nargs="*", default=[], metavar="PATTERN", help="models/adapters it may use (default: base models)"
    )
    keys.add_argument("--can_register", type=str2bool, default=False, help="may register adapters `TENANT:*`")
    keys.add_argument("--requests_per_minute", type=int, default=None)
    keys.add_argument("--tokens_per_minute", type=int, default=None)
    keys.set_defaults(func=cmd_keys)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving")
    group.add_argument("--served_model_name", default=None, help="the `model` clients send (default: the model type)")
    group.add_argument("--api_key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    group.add_argument("--admin_api_key", default=None, help="key for the adapter admin routes")
    group.add_argument("--state_dir", default=None, help="where the LoRA registry keeps its state")
    group.add_argument(
        "--database_url", default=None, help="postgresql://... for the LoRA registry's records (default: SQLite)"
    )
    group.add_argument(
        "--adapter_roots", nargs="*", default=[], metavar="DIR", help="folders adapters may be registered from"
    )
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--num_replicas", type=int, default=None, help="fixed LLMServer replicas (default: autoscale)")
    group.add_argument("--min_replicas", type=int, default=1)
    group.add_argument("--max_replicas", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="chat with a model in the terminal")
    add_model_args(infer)
    infer.add_argument("--max_new_tokens", type=int, default=None)
    infer.add_argument("--temperature", type=float, default=None)
    infer.add_argument("--top_p", type=float, default=None)
    infer.add_argument("--top_k", type=int, default=None)
    infer.add_argument("--repetition_penalty", type=float, default=None)
    infer.add_argument("--seed", type=int, default=None)
    infer.add_argument("--dataset", default=None, help="JSONL of {query, history?, system?, response?}: batch mode")
    infer.add_argument("--result_path", default=None, help="where batch results go (default: beside the dataset)")
    infer.add_argument(
        "--load_dataset_config",
        type=str2bool,
        default=False,
        help="batch-infer the validation set named in CKPT_DIR/sft_args.json when --dataset is not given",
    )
    infer.set_defaults(func=cmd_infer)
    deploy = sub.add_parser("deploy", help="serve the OpenAI-compatible API (Ray Serve)")
    add_model_args(deploy)
    add_serve_args(deploy)
    deploy.set_defaults(func=cmd_deploy)
    app_ui = sub.add_parser("app-ui", help="serve the app and its web chat page")
    add_model_args(app_ui)
    add_serve_args(app_ui)
    app_ui.set_defaults(func=cmd_app_ui)
    export = sub.add_parser(
        "export",
        help="merge a LoRA adapter into its base, check and copy a PEFT adapter, or convert a Qwen(1) checkpoint",
    )
    export.add_argument("--ckpt_dir", required=False, help="the adapter folder")
    export.add_argument("--model_type", default=None, help="base model type (default: the adapter's base)")
    export.add_argument("--model_id_or_path", default=None, help="base checkpoint dir (default: the adapter's base)")
    export.add_argument("--merge_lora", type=str2bool, default=False)
    export.add_argument("--trust_remote_code", type=str2bool, default=None, help="run the base checkpoint's own code")
    export.add_argument("--to_peft_format", type=str2bool, default=False)
    export.add_argument(
        "--to_qwen2",
        type=str2bool,
        default=False,
        help="convert a Qwen(1) checkpoint (qwen-7b-chat) to the Qwen2 layout vLLM serves",
    )
    export.add_argument("--output_dir", default=None, help="default: CKPT_DIR-merged (or -peft, -qwen2)")
    export.add_argument("--quant_bits", type=int, default=0, help="quantize to 4 or 8 bits (GPTQ, compressed-tensors)")
    export.add_argument("--quant_method", default="gptq", help="gptq (the method lorafleet runs)")
    export.add_argument(
        "--dataset", default=None, help="calibration JSONL of {query, response?} (default: shipped texts)"
    )
    export.set_defaults(func=cmd_export)
    add_keys_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) in ("create", "revoke") and not args.name:
        raise SystemExit(f"lorafleet: keys {args.action} needs --name")
    try:
        args.func(args)
    except LorafleetError as e:
        print(f"lorafleet: {e.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValidationError as e:
        print(f"lorafleet: invalid settings: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
