"""The output directory: checks before the merge, the merge itself (run_merge), metadata last."""
