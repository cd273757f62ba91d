"""`kosmos model summary`: parameter counts of a model config without allocating its weights."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="inspect model configurations")
    commands = model.add_subparsers(dest="model_command", required=True)
    summary = commands.add_parser("summary", help="parameter counts (meta device, nothing allocated)")
    summary.add_argument("--config", required=True, help="model YAML, e.g. configs/model/kosmos1.yaml")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(handler=_summary)


def _summary(args: argparse.Namespace) -> int:
    from kosmos.model import load_model_config, parameter_counts

    counts = parameter_counts(load_model_config(args.config))
    if args.json:
        print(json.dumps(counts))
    else:
        for name, value in counts.items():
            print(f"{name:>17}: {value:>15,}  ({value / 1e9:.3f}B)")
    return 0
