"""``fedray`` command line: ``fedray run SPEC.yaml [key=value ...]``, ``fedray sweep GRID.yaml``,
``fedray report EXPERIMENT``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from fedray.config import SpecError, load_spec

#: Exit code for input the user must change (bad spec, file, address).
EXIT_BAD_INPUT = 2
#: Errors a user can cause and fix: one line, EXIT_BAD_INPUT.
USER_ERRORS = (SpecError, ValueError, ConnectionError, FileExistsError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedray", description="Heterogeneous federated LoRA on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run a federated job from a YAML spec")
    run_parser.add_argument("spec", nargs="?", help="YAML spec, e.g. jobs/quickstart.yaml (not with --resume)")
    run_parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rounds=4 train.lr=1e-3")
    run_parser.add_argument("--run-dir", help="directory for this run's outputs (default runs/<name>/<time>)")
    run_parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db)")
    run_parser.add_argument("--address", help="Ray cluster to join (default RAY_ADDRESS, else a local Ray)")
    run_parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last complete round")
    run_parser.add_argument(
        "--allow-spec-change", action="store_true", help="with --resume: accept overrides of safe fields (rounds, eval)"
    )
    run_parser.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="with --run-dir: continue the run there if it has a checkpoint of this spec, else start it "
        "(for jobs that may be submitted again after a lost head node)",
    )
    run_parser.add_argument("--quiet", action="store_true", help="no progress; the summary is still printed")
    run_parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    sweep_parser = commands.add_parser("sweep", help="run every cell of a grid (variants x settings x seeds)")
    sweep_parser.add_argument("grid", help="YAML grid file, e.g. jobs/sweeps/quickstart.yaml")
    sweep_parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every cell")
    sweep_parser.add_argument("--sweep-dir", help="directory of the sweep's cells (default runs/sweeps/<name>)")
    sweep_parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db)")
    sweep_parser.add_argument("--address", help="Ray cluster to join (default RAY_ADDRESS, else a local Ray)")
    sweep_parser.add_argument("--max-concurrent", type=int, help="cells at once (default: what the cluster holds)")
    sweep_parser.add_argument("--again", nargs="+", default=(), metavar="CELL", help="run these cells afresh")
    sweep_parser.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="PATTERN",
        help="run only the cells whose ids match one of these shell patterns, e.g. '*/fedit-*/*'",
    )
    report_parser = commands.add_parser("report", help="compare the runs of an experiment: plots, table, HTML")
    report_parser.add_argument("experiment", help="MLflow experiment name (the spec's name)")
    report_parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db)")
    report_parser.add_argument("--out", help="output directory (default reports/<experiment>/)")
    report_parser.add_argument("--reference", help="the variant paired differences are taken against")
    args = parser.parse_args(argv)
    # A stop request (a spot instance's notice, `kill`, `ray job stop`) ends a run or sweep
    # as Ctrl-C does: the MLflow runs are marked KILLED and the checkpoints stay valid.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return _command(args, parser)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "report":
        return _report(args.experiment, args.tracking_uri, args.out, args.reference)
    if args.command == "sweep":
        return _sweep(args)
    return _run(args, parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    overrides = list(args.overrides)
    spec = None
    try:
        if args.resume:
            if args.spec and "=" not in args.spec:
                raise SpecError(
                    f"--resume takes no spec ({args.spec!r}): the run directory holds its own; "
                    "pass only dotted.key=value overrides after --resume RUN_DIR"
                )
            # With --resume every positional word is an override.
            overrides = [args.spec, *overrides] if args.spec else overrides
        elif not args.spec:
            parser.error("name a spec file (e.g. jobs/quickstart.yaml) or --resume RUN_DIR")
        else:
            # The spec alone, before the driver's imports: a typo fails in about a second.
            spec = load_spec(args.spec, overrides)
            if args.resume_if_exists and not args.run_dir:
                raise SpecError("--resume-if-exists needs --run-dir: the directory the run continues in")
    except SpecError as error:
        print(f"fedray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    _quiet_libraries()
    from fedray.driver.lifecycle import RunFailed, resume, run, run_or_resume

    try:
        if spec is None:
            summary = resume(
                args.resume,
                overrides,
                allow_spec_change=args.allow_spec_change,
                address=args.address,
                progress=not args.quiet,
            )
        else:
            summary = (run_or_resume if args.resume_if_exists else run)(
                spec,
                run_dir=args.run_dir,
                tracking_uri=args.tracking_uri,
                address=args.address,
                progress=not args.quiet,
            )
    except USER_ERRORS as error:
        print(f"fedray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as error:
        print(f"fedray: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run_dir = args.resume or args.run_dir or "RUN_DIR"
        print(f"fedray: interrupted; the MLflow run is marked KILLED; continue with `fedray run --resume {run_dir}`",
              file=sys.stderr)  # fmt: skip
        return 130
    # The summary is the command's result: stdout, whole lines, also with --quiet.
    print(json.dumps(summary.as_json()) if args.json else "\n".join(summary.lines()), flush=True)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedray.driver.grid import load_grid

    try:
        grid = load_grid(args.grid, args.overrides)  # every cell validated before anything runs
    except SpecError as error:
        print(f"fedray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _quiet_libraries()
    from fedray.driver.rounds import RunFailed
    from fedray.driver.sweep import sweep

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        summary = sweep(
            grid,
            sweep_dir=args.sweep_dir,
            tracking_uri=args.tracking_uri,
            address=args.address,
            max_concurrent=args.max_concurrent,
            again=args.again,
            only=args.only,
        )
    except USER_ERRORS as error:
        print(f"fedray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as error:
        print(f"fedray: {error}; run the same `fedray sweep` again to go on", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedray: interrupted; run the same `fedray sweep` again to go on", file=sys.stderr, flush=True)
        # The cells' threads cannot be interrupted; their checkpoints are on disk.
        os._exit(130)
    print(summary.table)
    print(f"sweep directory: {summary.sweep_dir}")
    print(f"MLflow parent run: {summary.parent_run_id} (open the MLflow UI: mlflow ui --backend-store-uri "
          f"{summary.tracking_uri})", flush=True)  # fmt: skip
    return 0


def _quiet_libraries() -> None:
    """Keep the libraries' start-up chatter out of a run's console: MLflow's and Alembic's
    lines on creating a new store, Ray's note that token authentication is on (the default)."""
    for name in ("mlflow.store.db.utils", "alembic", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _report(experiment: str, tracking_uri: str | None, out: str | None, reference: str | None) -> int:
    from fedray.tracking.report import write_report

    try:
        report = write_report(experiment, tracking_uri=tracking_uri, out_dir=out, reference=reference)
    except (ValueError, ConnectionError) as error:
        print(f"fedray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report.markdown)
    print()
    print(report.comparison)
    print(f"fedray: plots and HTML in {report.out_dir} (open {report.html})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
