"""``python -m components.data download|synth|trainids|validate|prepare`` — see ``--help`` of each verb."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.data", description="Cityscapes data tools.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    download = verbs.add_parser(
        "download",
        help="download and extract Cityscapes (gtFine + leftImg8bit)",
        description="Credentials come only from CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD.",
    )
    download.add_argument("--root", required=True, type=Path, help="folder to extract into")

    synth = verbs.add_parser("synth", help="generate a synthetic dataset in the Cityscapes layout")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--train", required=True, type=int, help="number of training frames")
    synth.add_argument("--val", required=True, type=int, help="number of validation frames")
    synth.add_argument("--height", type=int, default=128)
    synth.add_argument("--width", type=int, default=256, help="2 x height, like Cityscapes")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--cities", type=int, default=3)

    trainids = verbs.add_parser("trainids", help="write *_gtFine_labelTrainIds.png from the polygons")
    trainids.add_argument("--root", required=True, type=Path)
    trainids.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    validate = verbs.add_parser("validate", help="check a dataset's layout (and optionally label values)")
    validate.add_argument("--root", required=True, type=Path)
    validate.add_argument("--split", action="append", help="split to check (repeatable; default train+val)")
    validate.add_argument(
        "--values", action="store_true", help="also decode every label and check its values"
    )

    prepare = verbs.add_parser("prepare", help="fetch/generate, write trainIds and validate per a recipe")
    prepare.add_argument("--recipe", default="strong", help="recipe name or YAML path")
    prepare.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. data.source=local data.uri=/data"
    )

    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    if args.verb == "download":
        from components.data.download import download_cityscapes

        print(download_cityscapes(args.root))
    elif args.verb == "synth":
        from components.data.synth import generate_synthetic_cityscapes

        generate_synthetic_cityscapes(
            args.out,
            train=args.train,
            val=args.val,
            height=args.height,
            width=args.width,
            cities=args.cities,
            seed=args.seed,
        )
        print(args.out)
    elif args.verb == "trainids":
        from components.data.trainids import create_trainid_labels

        print(f"wrote {create_trainid_labels(args.root, workers=args.workers)} trainId label images")
    elif args.verb == "validate":
        from components.data.layout import read_label, split_pairs

        for split in args.split or ["train", "val"]:
            pairs = split_pairs(args.root, split)
            if args.values:
                for _, label in pairs:
                    read_label(label)
            print(f"{split}: {len(pairs)} image/label pairs OK")
    elif args.verb == "prepare":
        from components.config import load_config
        from components.data.prepare import prepare_dataset

        prepared = prepare_dataset(load_config(args.recipe, args.overrides).data)
        print(f"root={prepared.root} fingerprint={prepared.fingerprint}")


if __name__ == "__main__":
    sys.exit(main())
