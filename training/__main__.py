"""Command line: `python -m training train [CONFIG.yaml] [key=value ...]`,
`python -m training evaluate CHECKPOINT --json OUT.json [--plot OUT.png] [--baseline B.json ...] [--compare R.json ...]
[--data-dir D]` and
`python -m training plot REPORT.json ... --baseline B.json --out PLOT.png` and
`python -m training samples CHECKPOINT [--data-dir D]`."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lcs.checkpoint import CheckpointError
from lcs.paths import check_distinct, check_flag
from training.config import TrainConfig, options_help
from training.data import DataError
from training.distributed import env_rank, env_world

OTHER_RANK_WAIT_S = 10.0  # how long a rank other than 0 leaves an error to rank 0 (see _error)


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
    sm.add_argument("--data-dir", help="dataset location, if not the one recorded in the checkpoint")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "train":
            from training.config import load_config, split_config
            from training.train import train

            config, overrides = split_config(args.items)
            cfg = load_config(config, overrides)
            if config is not None:  # out= naming the config file replaced it with the checkpoint
                check_distinct(
                    [(f"out={cfg.out}", Path(cfg.out)), ("its state file", cfg.state_path)],
                    [("the config file", Path(config))],
                )
            default_term = signal.signal(signal.SIGTERM, _terminated)
            try:
                train(cfg, command="python -m training train " + shlex.join(args.items))  # re-runs as recorded
            except RuntimeError as err:
                if not _peer_gone(err):
                    raise
                _error(
                    "another process of this torchrun job stopped (its own error, or torchrun's report of its exit, "
                    f"says why), so this one cannot go on; {_rerun(cfg)}"
                )
                return 1
            except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: every finished epoch is saved; the command resumes
                code, what = (143, "terminated") if isinstance(stop, Terminated) else (130, "interrupted")
                if env_rank():  # under torchrun every rank got the signal; rank 0 says what its state file kept
                    return code
                if sys.stdout.isatty():
                    print()  # end the progress bar's line
                print(f"{what}; {_rerun(cfg)}", file=sys.stderr)
                return code
            finally:
                signal.signal(signal.SIGTERM, default_term)
            return 0
        if args.cmd == "plot":
            from training.evaluate import plot, read_report

            check_flag(args.out, "--out", "plot.png", suffix=".png")
            check_distinct(
                [(f"--out {args.out}", args.out)],
                [(f"report {r}", r) for r in args.reports] + [(f"--baseline {b}", b) for b in args.baseline],
            )
            reports = {r: read_report(r, "report", subspace=True) for r in args.reports}
            baselines = {b: read_report(b, "--baseline", subspace=False) for b in args.baseline}
            _same_kind(reports, "report")
            reps = _by_name(reports)
            first = next(iter(reps.values()))
            plot(reps, _by_name(baselines), args.out, _title(first))
            print(f"wrote {args.out}")
            return 0
        if args.cmd == "samples":
            from training.train import attach_samples

            attach_samples(args.checkpoint, data_dir=args.data_dir)
            print(f"stored sample images in {args.checkpoint}")
            return 0
        return _evaluate(args)
    except (CheckpointError, DataError, ValueError, OSError) as err:  # OSError: a file named here is missing
        _error(str(err))
        return 2
    except KeyboardInterrupt:
        if not env_rank():
            print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM (a container stopped, a job preempted) during training: handled as Ctrl-C is, and exit 143. It
    ended the process at once, with no word on what was saved."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def _rerun(cfg: TrainConfig) -> str:
    """What rerunning the same command does after a run stopped: resume from its state file, or start over."""
    from training.train import saved_epoch

    done = saved_epoch(cfg)
    if done is None:
        return "no epoch finished yet, nothing saved; rerun the same command to start over"
    return f"state saved after epoch {done}; rerun the same command to resume"


# how gloo words a collective whose peer process has gone (crashed, killed, or stopped on an error of its own)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_gone(err: RuntimeError) -> bool:
    """Is `err` a collective failing because another rank of a torchrun job stopped? It surfaced as gloo's
    traceback: after rank 0's one-line error on the rank waiting for it, and on rank 0, in place of what its
    state file kept, when another rank was killed."""
    return env_world() > 1 and any(words in str(err) for words in PEER_GONE)


def _error(message: str) -> None:
    """Print `error: message` once per torchrun job, not once per rank: every rank runs the same command on the
    same files, so rank 0 meets the same error and prints it, and torchrun stops the other ranks when it exits.
    Another rank prints (naming itself) only if that has not happened within OTHER_RANK_WAIT_S: an error of its
    own, such as a node without the dataset, while rank 0 waits for it."""
    rank = env_rank()
    if rank:
        time.sleep(OTHER_RANK_WAIT_S)
        message = f"rank {rank}: {message}"
    print(f"error: {message}", file=sys.stderr)


def _evaluate(args: argparse.Namespace) -> int:
    """`evaluate`: every file argument is checked before the evaluation (minutes on the real test set), and
    the accuracies are printed before any file is written, so a bad path never costs the measurement."""
    from lcs import checkpoint
    from lcs.paths import write_json
    from training.evaluate import evaluate_checkpoint, plot, read_report

    if (args.baseline or args.compare) and not args.plot:  # they only draw on the plot: ignoring them hid a typo
        given = "--baseline" if args.baseline else "--compare"
        raise ValueError(f"{given} only draws on the plot; add --plot OUT.png, or leave {given} out")
    check_flag(args.json, "--json", "report.json")
    if args.plot:
        check_flag(args.plot, "--plot", "plot.png", suffix=".png")
    check_distinct(
        [(f"--json {args.json}", args.json)] + ([(f"--plot {args.plot}", args.plot)] if args.plot else []),
        [(f"the checkpoint {args.checkpoint}", args.checkpoint)]
        + [(f"--baseline {b}", b) for b in args.baseline]
        + [(f"--compare {c}", c) for c in args.compare],
    )
    baselines = _by_name({b: read_report(b, "--baseline", subspace=False) for b in args.baseline})
    compare = {c: read_report(c, "--compare", subspace=True) for c in args.compare}
    if compare:  # drawn on this checkpoint's axis (its kind's compression level)
        _same_kind({args.checkpoint: {"kind": checkpoint.read_meta(args.checkpoint).kind}, **compare}, "--compare")
        _by_name({args.checkpoint: {}, **compare})

    rep = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir)
    for p in rep["points"]:
        print(f"alpha {p['alpha']:.3f}  level {p['level']:>7g}  accuracy {p['accuracy']:.2f} %", flush=True)
    write_json(args.json, rep)
    print(f"wrote {args.json}")
    if args.plot:
        plot(_by_name({args.checkpoint: rep, **compare}), baselines, args.plot, _title(rep))
        print(f"wrote {args.plot}")
    return 0


def _same_kind(reports: dict[Path, dict[str, Any]], what: str) -> None:
    """Lines on one plot share its x axis, the compression level of one kind (sparsity, width or bits)."""
    (first, rep), *rest = reports.items()
    for path, other in rest:
        if other["kind"] != rep["kind"]:
            raise ValueError(
                f"{what} {path}: a {other['kind']} report, but {first} is {rep['kind']}; lines on one plot share "
                "its compression axis: plot reports of one kind together"
            )


def _by_name(reports: dict[Path, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Reports by file name without its suffix, as the plot's legend names them; two of one name would share a
    legend entry (and one would be lost): refused."""
    named: dict[str, Path] = {}
    for path in reports:
        if path.stem in named and named[path.stem] != path:
            raise ValueError(
                f"{path} and {named[path.stem]}: the plot's legend names lines by file name, and both are "
                f"{path.stem!r}: copy one to another name"
            )
        named[path.stem] = path
    return {stem: reports[path] for stem, path in named.items()}


def _title(rep: dict[str, Any]) -> str:
    return f"{rep['kind']} ({rep['dataset']})" if rep.get("dataset") else str(rep["kind"])


if __name__ == "__main__":
    sys.exit(main())
