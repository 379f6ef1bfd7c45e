"""Write the example model family used by the quick start and configs/*.yml.

examples/models/base is a tiny Llama (hidden 64, 4 layers, bfloat16, a 384-token byte-level
BPE tokenizer); instruct, code and math are fine-tunes of it (base + seeded gaussian noise),
all with the same tokenizer. The output is deterministic and committed, so the quick start
needs no network; rerun this script (with --overwrite) only to regenerate it:

    python examples/make_models.py --overwrite
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mergeflow.testing import make_family

FINETUNES = ("instruct", "code", "math")
DEFAULT_OUT = Path(__file__).resolve().parent / "models"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace existing models")
    args = parser.parse_args(argv)
    models = make_family(args.out, seed=0, finetunes=FINETUNES, noise=0.01,
                         overwrite=args.overwrite)
    for name, path in models.items():
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{name:9s} {path}  ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
