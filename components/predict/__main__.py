"""``python -m components.predict``: the command line of batch inference (see components/predict/)."""

from __future__ import annotations

import argparse

from components.cli import run_cli
from components.predict.inputs import MAX_PIXELS
from components.predict.model_file import DEFAULT_CACHE
from components.predict.run import segment_inputs
from components.serving import DEVICES, PRECISIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.predict", description="Segment images with an exported/registered model."
    )
    parser.add_argument(
        "--model", required=True, help="models:/name@alias, models:/name/version or a .onnx path"
    )
    parser.add_argument("--input", required=True, help="a folder, a glob pattern or an s3:// prefix")
    parser.add_argument(
        "--output",
        required=True,
        help="folder or s3:// prefix (trainIds/, labelIds/, overlay/, manifest.jsonl)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-side", type=int, default=2048, help="larger images are tiled or resized")
    parser.add_argument("--large", choices=("tile", "resize"), default="tile")
    parser.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help="larger images are refused (memory bound)"
    )
    parser.add_argument(
        "--skip-bad", action="store_true",
        help="skip corrupt/unsupported images (listed in the manifest) instead of refusing the whole run",
    )  # fmt: skip
    parser.add_argument("--no-overlay", action="store_true", help="write masks only")
    parser.add_argument("--cache-dir", help=f"model cache (default $CITYSEG_CACHE or {DEFAULT_CACHE})")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="auto: the GPU when one is visible, else the CPU; cuda: a GPU or an error; cpu",
    )  # fmt: skip
    parser.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="--device cpu")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="the ONNX variant: int8 runs ~2-3x faster on CPUs (exported with export.int8=true)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    def run() -> None:
        summary = segment_inputs(
            args.model,
            args.input,
            args.output,
            batch_size=args.batch_size,
            max_side=args.max_side,
            large=args.large,
            max_pixels=args.max_pixels,
            skip_bad=args.skip_bad,
            overlays=not args.no_overlay,
            cache_dir=args.cache_dir,
            device=args.device,
            precision=args.precision,
        )
        print(
            f"segmented {len(summary.segmented)} images into {args.output} with {summary.model.name} "
            f"v{summary.model.version} on {summary.provider} ({summary.resumed} done before, "
            f"{len(summary.failed)} skipped as bad; manifest: {summary.manifest})"
        )

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
