"""The ``genrec`` command: prepare, train, doctor.

Each subcommand is a thin wrapper: it parses arguments, calls the library and prints a
short report. Heavy imports happen inside the subcommand so ``genrec doctor`` works even
when torch or torchrec do not import.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _cmd_doctor(args: argparse.Namespace) -> int:
    from torchrec_genrec.stack import run_checks

    checks = run_checks()
    failed = [c for c in checks if not c.ok]
    if not args.quiet or failed:
        for c in checks:
            print(f"{'ok ' if c.ok else 'BAD'}  {c.name:<18} {c.detail}")
        for c in failed:
            print(f"\nfix ({c.name}): {c.fix}")
    if failed:
        print(f"\n{len(failed)} problem(s) found.", file=sys.stderr)
        return 1
    if not args.quiet:
        print("\nThe stack is the known-good combination.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="check the installed torch / fbgemm / torchrec / torchx stack")
    doctor.add_argument("--quiet", action="store_true", help="print only problems")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
