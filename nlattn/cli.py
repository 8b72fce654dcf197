"""The ``nlattn`` command: ``nlattn conformance``, ``nlattn golden`` and ``nlattn convert``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _conformance(args) -> int:
    from .conformance import (
        BUILTIN,
        adapter_names,
        available_adapters,
        format_table,
        load_adapter,
        run_conformance,
        select,
    )
    from .conformance.golden import GoldenError

    names = adapter_names(args.framework) if args.framework else list(BUILTIN)
    unknown = [f for f in args.framework or () if not adapter_names([f])]
    if unknown:
        print(f"unknown framework(s) {unknown}: choose from {sorted(BUILTIN)}", file=sys.stderr)
        return 2
    theirs = []
    for spec in args.adapter:  # first: a typo should not wait for three frameworks to import
        try:
            theirs.append(load_adapter(spec))
        except Exception as e:  # a user's module: any import-time error is theirs to read
            print(f"conformance: cannot load adapter {spec!r}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    adapters, missing = available_adapters(names)
    adapters += theirs
    for name, why in missing.items():
        print(f"[{name}] not available: {why}", file=sys.stderr)
    if args.framework and missing:
        return 2
    cases = select(args.block, args.case)
    if not cases:
        print("no case matches", file=sys.stderr)
        return 2
    try:
        results = run_conformance(
            adapters, cases, progress=not args.no_progress, **({"golden_dir": Path(args.golden)} if args.golden else {})
        )
    except GoldenError as e:
        print(f"conformance: golden vectors unusable: {e}", file=sys.stderr)
        return 3
    print(format_table(results))
    return 0 if all(r.passed for r in results) else 1


def _line(command: str, error: Exception) -> str:
    """One line for the user: the command, then the error's message (once)."""
    text = str(error)
    return text if text.startswith(f"{command}:") else f"{command}: {text}"


def _golden(args) -> int:
    from .conformance.golden import GOLDEN_DIR, write_all

    paths = write_all()
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} golden files ({size / 1e6:.2f} MB) to {GOLDEN_DIR}")
    return 0


def _config_value(text: str):
    """``--config`` values: Python/JSON literals (8, 0.5, True, null, (7, 7)), else the string."""
    import ast
    import json

    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def _convert(args) -> int:
    from .errors import ConfigError, WeightError
    from .weights.convert import FORMATS, LOAD_HINTS, check_destination, read_checkpoint, write_checkpoint

    config = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"convert: --config expects key=value, got {item!r}", file=sys.stderr)
            return 2
        config[key.strip()] = _config_value(value.strip())
    try:
        check_destination(args.dst)
    except (ValueError, OSError) as e:
        print(_line("convert", e), file=sys.stderr)
        return 2
    try:
        ckpt = read_checkpoint(args.src, args.source, block=args.block, config=config, prefix=args.prefix)
    except (ConfigError, WeightError, OSError, ImportError, ValueError) as e:
        print(_line("convert", e), file=sys.stderr)
        return 1
    try:
        fmt = write_checkpoint(ckpt, args.dst)
    except Exception as e:  # a full disk, a vanished directory, the writer's own errors: one line
        print(f"convert: cannot write {args.dst}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(ckpt.summary())
    print(f"wrote {len(ckpt.weights)} tensors to {args.dst} ({FORMATS[fmt][0]}); read it back with: {LOAD_HINTS[fmt]}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nlattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("conformance", help="check every framework against the float64 reference")
    c.add_argument(
        "--framework", action="append", help="numpy, torch, keras or flax (repeatable; default: every one installed)"
    )
    c.add_argument(
        "--adapter", action="append", default=[], metavar="MODULE:CLASS", help="a third-party adapter to check as well"
    )
    c.add_argument("--block", action="append", help="only this block class (repeatable)")
    c.add_argument("--case", action="append", help="only cases whose id contains this (repeatable)")
    c.add_argument("--golden", metavar="DIR", help="golden vectors to check against (default: the packaged ones)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_conformance)
    g = sub.add_parser(
        "golden",
        help="regenerate the golden vectors from the reference (a deliberate change of semantics: review the diff)",
    )
    g.set_defaults(func=_golden)
    v = sub.add_parser(
        "convert",
        help="convert a published or canonical checkpoint to canonical "
        ".safetensors, a torch .pt state dict, Keras .weights.h5 or a Flax .msgpack",
    )
    v.add_argument("src", metavar="SRC", help="checkpoint file (.safetensors, .pt/.pth, .pkl, .npz)")
    v.add_argument(
        "dst",
        metavar="DST",
        help="output file: .safetensors (canonical, with metadata), "
        ".pt/.pth (torch state dict), .weights.h5 (Keras) or .msgpack (Flax nnx state)",
    )
    v.add_argument(
        "--source",
        help="published source naming: alexhex7, caffe2, timm, danet, sagan, "
        "ccnet, rga, cfpnet (default: SRC is already canonical)",
    )
    v.add_argument("--block", help="block class name when SRC holds canonical names without nlattn metadata")
    v.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor keyword (repeatable), e.g. --config mode=dot_product",
    )
    v.add_argument("--prefix", help="key prefix of the block inside a bigger checkpoint")
    v.set_defaults(func=_convert)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
