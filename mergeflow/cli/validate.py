"""`mergeflow validate CONFIG`: check the config and every model's headers; merge nothing."""

from __future__ import annotations

import sys

from mergeflow.cli.plan import _plan


def cmd_validate(args) -> int:
    from mergeflow.spec.config import load_config
    from mergeflow.spec.multi import is_multi

    if is_multi(args.config):
        from mergeflow.cli.multi import cmd_validate_multi

        return cmd_validate_multi(args)
    config = load_config(args.config)
    warnings = config.warnings if args.config_only else _plan(args).warnings  # the plan's include the config's
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{args.config}: ok ({config.merge_method})")
    return 0
