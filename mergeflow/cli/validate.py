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
    if not args.config_only:
        plan = _plan(args)
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
    print(f"{args.config}: ok ({config.merge_method})")
    return 0
