"""`diffusers-moc train CONFIG`: LoRA fine-tuning through MoC attention (also under `accelerate launch`).

Config and data errors are found before any model loads and print one line naming the field (exit code 2). Ctrl-C
or a kill leaves the complete checkpoints; `--resume latest` continues from the newest. A run that already reached
`training.max_steps` says so and writes nothing.
"""

from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a Wan or HunyuanVideo 1.5 transformer with LoRA through MoC attention",
        description=(
            "Fine-tune a Wan or HunyuanVideo 1.5 (text-to-video) transformer with a PEFT LoRA adapter through "
            "Mixture-of-Contexts attention, annealing "
            "top_k from dense to the target. Multi-GPU: accelerate launch -m diffusers_moc.cli train CONFIG"
        ),
    )
    parser.add_argument("config", help="YAML training config (see examples/train_lora.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.max_steps=100 (repeatable; values parsed as YAML)",
    )
    parser.add_argument("--resume", metavar="CHECKPOINT", help="checkpoint folder or 'latest' (overrides the config)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training import MoCLoRATrainer, load_train_config

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # --resume is a path (or 'latest'), never parsed as YAML: a folder named `2024` must not become an integer.
    config = load_train_config(args.config, list(args.overrides), resume_from=args.resume or None)
    result = MoCLoRATrainer(config).train()
    if result.final_dir:
        print(f"trained {result.global_step} steps; MoC LoRA saved to {result.final_dir}")
    elif result.message:
        print(result.message)
    return 0
