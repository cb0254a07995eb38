"""Run the benchmarks, print the table, write ``bench/results.json`` and ``bench/RESULTS.md``.

    python -m bench.run                      # everything (make bench), ~25 min on 2 cores
    python -m bench.run --only evaluation    # one benchmark

Every row is ours vs the reference measured side by side in this process on the project's synthetic
full-size data (generated once under ``--work-dir``). The GPU rows come from ``python -m bench.gpu_check``
(``make gpu-check``, on a CUDA machine), which keeps them in ``bench/gpu_results.json``; RESULTS.md shows
them with their own machine, date and commit. Exit status 1 when any row's results differ from its
reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Row, machine, source_commit, synthetic_dataset

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).parent
BENCHMARKS = ("input", "trainids", "evaluation", "inference", "manifest")
GPU_HEADING = "## GPU check"
OLD_GPU_JSON = BENCH_DIR / "gpu_results_old_code.json"
"""The GPU rows of 2026-11-26 (torch 2.11, before the training step was rewritten): kept until
``make gpu-check`` has measured the current code."""


def run_benchmarks(
    work_dir: Path,
    *,
    only: tuple[str, ...] = BENCHMARKS,
    train: int = 24,
    val: int = 64,
    height: int = 1024,
    width: int = 2048,
    repeats: int = 5,
    trainid_copies: int = 6,
    on_row: Callable[[Row], None] = lambda row: None,
) -> list[Row]:
    """The selected benchmarks' rows: the defaults are the real benchmark, smaller sizes a smoke test."""
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}: choose from {list(BENCHMARKS)}")
    work_dir = Path(work_dir)
    root = synthetic_dataset(work_dir, train=train, val=val, height=height, width=width)
    rows: list[Row] = []

    def add(new: Row | list[Row]) -> None:
        for row in new if isinstance(new, list) else [new]:
            rows.append(row)
            on_row(row)

    # Imported here: each module pulls in its own heavy libraries, and spawned workers import this one.
    if "input" in only:
        from bench.input_pipeline import bench_input_pipeline

        for recipe in ("paper", "strong"):
            add(bench_input_pipeline(root, recipe, repeats=repeats))
    if "trainids" in only:
        from bench.trainids import bench_trainids

        add(bench_trainids(root, work_dir / "trainids", copies=trainid_copies, repeats=repeats))
    if "evaluation" in only:
        from bench.evaluation import bench_evaluation

        add(bench_evaluation(root, work_dir / "evaluation", repeats=repeats))
    if "inference" in only:
        from bench.inference import bench_inference, bench_predict_path

        add(bench_inference(work_dir / "inference", repeats=repeats))
        for precision in ("fp32", "int8"):
            add(
                bench_predict_path(root, work_dir / "inference", repeats=min(repeats, 3), precision=precision)
            )
    if "manifest" in only:
        from bench.manifest import bench_manifest

        add(bench_manifest(work_dir / "manifest"))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| what | ours | reference | unit | ratio | target | met | identical | notes |",
        "|---|---:|---:|---|---:|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["what"],
            _number(row["ours"]),
            _number(row["reference"]),
            row["unit"],
            f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-",
            row["target"] or "-",
            _flag(row["met"]),
            _flag(row["identical"]),
            row["notes"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(run: dict[str, Any], gpu_run: dict[str, Any] | None) -> str:
    """``RESULTS.md``: this run's table and context, then the GPU check's section."""
    parts = [
        "# Benchmark results",
        "",
        "Written by `python -m bench.run` (`make bench`); never edited by hand. Ratio = ours / reference "
        "in the row's unit (images/s: higher is better; ms: lower is better), both measured side by side "
        "in one process, median of repeats.",
        "",
        _context(run),
        "",
        table(run["rows"]),
    ]
    missed = [row for row in run["rows"] if row["met"] is False]
    if missed:
        parts += ["", "Missed targets:"]
        parts += [
            f"- {row['what']}: ours {_number(row['ours'])} {row['unit']}, {row['ratio']:.2f}x the reference; "
            f"target {row['target']}"
            for row in missed
        ]
    return "\n".join(parts) + "\n\n" + gpu_markdown(gpu_run)


def gpu_markdown(gpu_run: dict[str, Any] | None) -> str:
    """The GPU section: the last ``bench.gpu_check`` record (measured, or why not), then the rows of the
    old code while ``OLD_GPU_JSON`` exists."""
    parts = [
        GPU_HEADING,
        "",
        "Written by `python -m bench.gpu_check` (`make gpu-check`, see bench/README.md).",
    ]
    if gpu_run is None:
        parts += ["", "No GPU check recorded."]
    elif gpu_run.get("mode") == "not run":
        parts += [
            "",
            f"- Recorded: {gpu_run['date']}; commit: {gpu_run['commit']}",
            "",
            table(gpu_run["rows"]),
        ]
    else:
        parts += ["", _context(gpu_run)]
        parts += [f"- Estimate {gpu_run['estimate_s']:.0f} s, budget {gpu_run['budget_s']:.0f} s; sections: "]
        parts[-1] += "; ".join(f"{name} {record['status']}" for name, record in gpu_run["sections"].items())
        parts += ["", table(gpu_run["rows"])]
    if OLD_GPU_JSON.is_file():
        old = json.loads(OLD_GPU_JSON.read_text())
        parts += [
            "",
            "### Old code: GPU rows of 2026-11-26 (torch 2.11), before the training step was rewritten",
            "",
            "Measured by `bench.gpu_training` (since replaced by `bench.gpu_check`) on the trainer of that "
            "day, against the paper's setup: not the current code. Kept until `make gpu-check` measures it.",
            "",
            _context(old),
            "",
            table(old["rows"]),
        ]
    return "\n".join(parts) + "\n"


def replace_gpu_section(results: Path, gpu_run: dict[str, Any]) -> None:
    """Rewrite the GPU section of ``results`` (the rest stays as ``bench.run`` wrote it)."""
    head = results.read_text().split(GPU_HEADING)[0].rstrip() if results.is_file() else "# Benchmark results"
    _write(results, head + "\n\n" + gpu_markdown(gpu_run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"), help="data and scratch (reused)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--train", type=int, default=24, help="synthetic train frames (input pipeline)")
    parser.add_argument("--val", type=int, default=64, help="synthetic val frames (evaluation)")
    parser.add_argument("--height", type=int, default=1024, help="synthetic frame height (width = 2x)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per side (median)")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results.json")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--gpu-json", type=Path, default=BENCH_DIR / "gpu_results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("onnxscript", "onnx_ir"):  # the ONNX exporter's passes log every rewrite at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)

    context = machine()
    started = time.perf_counter()
    rows = run_benchmarks(
        args.work_dir,
        only=tuple(args.only),
        train=args.train,
        val=args.val,
        height=args.height,
        width=2 * args.height,
        repeats=args.repeats,
        on_row=lambda row: print(
            f"{row.what}: {_number(row.ours)} vs {_number(row.reference)} {row.unit}", flush=True
        ),
    )
    run = {
        "command": " ".join(
            ["python -m bench.run", shlex.join(sys.argv[1:] if argv is None else argv)]
        ).strip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": source_commit(),
        "machine": context,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "rows": [row.to_dict() for row in rows],
    }
    _write(args.json, json.dumps(run, indent=2))
    gpu_run = json.loads(args.gpu_json.read_text()) if args.gpu_json.is_file() else None
    _write(args.results, results_markdown(run, gpu_run))
    print(table(run["rows"]))
    print(f"\n{run['seconds']:.0f} s; wrote {args.json} and {args.results}")
    return 1 if any(row.identical is False for row in rows) else 0


def _context(run: dict[str, Any]) -> str:
    m = run["machine"]
    return "\n".join(
        [
            f"- Command: `{run['command']}` ({run['seconds']:.0f} s)",
            f"- Date: {run['date']}; commit: {run['commit']}",
            f"- Machine: {m['cpu']}, {m['cores']} cores; GPU: {m['gpu'] or 'none'}; "
            f"Python {m['python']}, torch {m['torch']}",
            f"- Load average (1/5/15 min) at start: {m['load_average']}, at end: {run['load_average_end']}",
        ]
    )


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _flag(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


def _write(path: Path, text: str) -> None:
    """Write through a temporary name so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
