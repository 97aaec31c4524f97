"""`alloy`: the command line. Merge commands run in-process; service commands start processes.

Each group of commands lives beside what it drives and registers itself here:
merge_ops/cli.py (merge, methods), service/cli_service.py (serve, worker, reaper, scheduler, migrate,
up, submit) and service/cli_schedules.py (schedules). Heavy imports happen inside the commands, so
`alloy --help` is instant.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from merge_ops import cli as merge_cli
    from service import cli_schedules, cli_service

    p = argparse.ArgumentParser(
        prog="alloy",
        description="Alloy merges fine-tuned experts of one base model into one model and publishes it. "
        "Run `alloy merge SPEC.yaml --out DIR` for a local merge, `alloy up` for the whole service.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    merge_cli.register(sub)
    cli_service.register(sub)
    cli_schedules.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from merge_ops.errors import AlloyError, InputError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"alloy: error: {e.message}", file=sys.stderr)
        return 2
    except AlloyError as e:
        print(f"alloy: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alloy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `alloy methods | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
