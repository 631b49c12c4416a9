"""``fedray`` command line: ``fedray run SPEC.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import os
import sys

from fedray.config import SpecError, load_spec

#: Exit code for input the user must change (bad spec, file, address).
EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedray", description="Heterogeneous federated LoRA on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run a federated job from a YAML spec")
    run_parser.add_argument("spec", help="YAML spec, e.g. jobs/quickstart.yaml")
    run_parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rounds=4 train.lr=1e-3")
    run_parser.add_argument("--run-dir", help="directory for this run's outputs (default runs/<name>/<time>)")
    run_parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db)")
    run_parser.add_argument("--address", help="Ray cluster to join (default RAY_ADDRESS, else a local Ray)")
    run_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as error:
        print(f"fedray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from fedray.server import run

    try:
        run(spec, run_dir=args.run_dir, tracking_uri=args.tracking_uri, address=args.address, progress=not args.quiet)
    except (ValueError, ConnectionError, FileExistsError, FileNotFoundError) as error:
        print(f"fedray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fedray: interrupted; the MLflow run is marked KILLED", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
