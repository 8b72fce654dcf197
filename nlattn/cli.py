"""The ``nlattn`` command: ``nlattn conformance`` and ``nlattn golden``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _conformance(args) -> int:
    from .conformance import BUILTIN, available_adapters, format_table, load_adapter, run_conformance, select
    from .conformance.golden import GoldenError

    names = args.framework or list(BUILTIN)
    adapters, missing = available_adapters(names)
    adapters += [load_adapter(spec) for spec in args.adapter]
    for name, why in missing.items():
        print(f"[{name}] not available: {why}", file=sys.stderr)
    if args.framework and missing:
        return 2
    cases = select(args.block, args.case)
    if not cases:
        print("no case matches", file=sys.stderr)
        return 2
    try:
        results = run_conformance(adapters, cases, progress=not args.no_progress,
                                  **({"golden_dir": Path(args.golden)} if args.golden else {}))
    except GoldenError as e:
        print(f"conformance: golden vectors unusable: {e}", file=sys.stderr)
        return 3
    print(format_table(results))
    return 0 if all(r.passed for r in results) else 1


def _golden(args) -> int:
    from .conformance.golden import GOLDEN_DIR, write_all

    paths = write_all()
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} golden files ({size / 1e6:.2f} MB) to {GOLDEN_DIR}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nlattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("conformance", help="check every framework against the float64 reference")
    c.add_argument("--framework", action="append", help="numpy, torch, keras or flax (repeatable; "
                   "default: every one installed)")
    c.add_argument("--adapter", action="append", default=[], metavar="MODULE:CLASS",
                   help="a third-party adapter to check as well")
    c.add_argument("--block", action="append", help="only this block class (repeatable)")
    c.add_argument("--case", action="append", help="only cases whose id contains this (repeatable)")
    c.add_argument("--golden", metavar="DIR", help="golden vectors to check against (default: the packaged ones)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_conformance)
    g = sub.add_parser("golden", help="regenerate the golden vectors from the reference "
                       "(a deliberate change of semantics: review the diff)")
    g.set_defaults(func=_golden)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
