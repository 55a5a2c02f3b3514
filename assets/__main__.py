"""``python -m kdtune.assets --out DIR [--vocab small|llama3] [--seed N]``: build tiny assets."""

from __future__ import annotations

import argparse

from kdtune.assets.build import build_tiny_assets
from kdtune.assets.tokenizer import VOCABS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdtune.assets",
        description="Write tiny offline KD assets: a BPE tokenizer, Llama-3-architecture teacher "
        "and student checkpoints (Hugging Face format) and an alpaca-style dataset.",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--vocab",
        choices=VOCABS,
        default="small",
        help="small: 512-row models; llama3: 128,256-row models with canonical special-token ids",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights (>= 0)")
    args = parser.parse_args(argv)

    try:
        result = build_tiny_assets(args.out, vocab=args.vocab, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    action = "reused" if result.reused else "wrote"
    print(
        f"{action} tiny assets in {result.assets.root} "
        f"(vocab={args.vocab}, seed={args.seed}, model vocab_size={result.assets.vocab_size}):"
    )
    for path in result.files:
        print(f"  {path}  ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
