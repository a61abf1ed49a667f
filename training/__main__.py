"""Command line: `python -m training train [CONFIG.yaml] [key=value ...]`,
`python -m training evaluate CHECKPOINT --json OUT.json [--plot OUT.png] [--baseline B.json ...]` and
`python -m training plot REPORT.json ... --baseline B.json --out PLOT.png` and
`python -m training samples CHECKPOINT`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from lcs.checkpoint import CheckpointError
from training.config import options_help
from training.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train a compressible subspace (or a fixed-alpha baseline)",
        description="Train a compressible subspace (or a fixed-alpha baseline) and write its checkpoint.",
        epilog=options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="an optional YAML config first, then key=value overrides (e.g. epochs=2 kind=quantized)",
    )
    e = sub.add_parser("evaluate", help="measure test accuracy on the checkpoint's alpha grid")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--json", type=Path, required=True, help="write the report here")
    e.add_argument("--plot", type=Path, help="also write a PNG of accuracy against compression level")
    e.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="a baseline's report JSON to draw on the same axes (repeatable)",
    )
    e.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another subspace report JSON to draw on the same axes (repeatable), e.g. LCS+P next to LCS+L",
    )
    e.add_argument("--data-dir", help="dataset location, if not the one recorded in the checkpoint")
    pl = sub.add_parser("plot", help="draw accuracy against compression level from existing report JSONs")
    pl.add_argument("reports", type=Path, nargs="+", help="subspace reports (evaluate --json output)")
    pl.add_argument("--baseline", type=Path, action="append", default=[], help="a baseline's report (repeatable)")
    pl.add_argument("--out", type=Path, required=True, help="the PNG to write")
    sm = sub.add_parser(
        "samples", help="store sample training images in a checkpoint written before checkpoints carried them"
    )
    sm.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "train":
            from training.config import load_config
            from training.train import train

            items = list(args.items)
            config_path = items.pop(0) if items and "=" not in items[0] else None
            cfg = load_config(config_path, items)
            try:
                train(cfg, command="python -m training train " + shlex.join(args.items))  # re-runs as recorded
            except KeyboardInterrupt:  # Ctrl-C: every finished epoch is saved, and the same command resumes
                from training.train import saved_epoch

                if sys.stdout.isatty():
                    print()  # end the progress bar's line
                done = saved_epoch(cfg)
                print(
                    "interrupted; no epoch finished yet, nothing saved; rerun the same command to start over"
                    if done is None
                    else f"interrupted; state saved after epoch {done}; rerun the same command to resume",
                    file=sys.stderr,
                )
                return 130
            return 0
        if args.cmd == "plot":
            from training.evaluate import plot

            reps = {r.stem: json.loads(r.read_text()) for r in args.reports}
            first = next(iter(reps.values()))
            plot(
                reps,
                {b.stem: json.loads(b.read_text()) for b in args.baseline},
                args.out,
                f"{first['kind']} ({first['dataset']})",
            )
            print(f"wrote {args.out}")
            return 0
        if args.cmd == "samples":
            from training.train import attach_samples

            attach_samples(args.checkpoint)
            print(f"stored sample images in {args.checkpoint}")
            return 0
        from training.evaluate import evaluate_checkpoint, plot, write_json

        rep = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir)
        write_json(rep, args.json)
        for p in rep["points"]:
            print(f"alpha {p['alpha']:.3f}  level {p['level']:>7g}  accuracy {p['accuracy']:.2f} %")
        if args.plot:
            baselines = {b.stem: json.loads(b.read_text()) for b in args.baseline}
            reports = {args.checkpoint.stem: rep, **{c.stem: json.loads(c.read_text()) for c in args.compare}}
            plot(reports, baselines, args.plot, f"{rep['kind']} ({rep['dataset']})")
        return 0
    except (CheckpointError, DataError, ValueError, OSError) as err:  # OSError: a file named here is missing
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
