"""The ``nlattn`` command: ``nlattn conformance``, ``golden``, ``convert``, ``viz`` and ``info``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _conformance(args) -> int:
    import os

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
    uses_tf = os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow" and any("keras" in n for n in names)
    if uses_tf and "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        # TensorFlow's start-up lines (absl, oneDNN) come from C++ before any log level applies:
        # import it once with the stderr descriptor pointed at /dev/null (a user's setting wins)
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import tensorflow  # noqa: F401
        except ImportError:
            pass  # the keras columns say so below
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
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
    return 1 if any(r.failed for r in results) else 0  # "not supported" was declared: not a failure


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


def _config(command: str, items) -> dict | None:
    """``--config key=value`` items as keywords; None (after one line on stderr) if one is malformed."""
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"{command}: --config expects key=value, got {item!r}", file=sys.stderr)
            return None
        config[key.strip()] = _config_value(value.strip())
    return config


def _convert(args) -> int:
    from .errors import ConfigError, WeightError
    from .weights.convert import FORMATS, LOAD_HINTS, check_destination, read_checkpoint, write_checkpoint

    config = _config("convert", args.config)
    if config is None:
        return 2
    to_onnx = args.dst.lower().endswith(".onnx")
    if to_onnx != (args.input_shape is not None):
        print(
            "convert: an .onnx destination needs --input-shape B,C,... (the shape its graph is traced at), "
            "and --input-shape needs an .onnx destination",
            file=sys.stderr,
        )
        return 2
    shape = _ints("convert", "--input-shape", args.input_shape) if to_onnx else None
    if to_onnx and not shape:
        return 2
    try:
        if to_onnx:
            folder = Path(args.dst).resolve().parent
            if not folder.is_dir():
                raise FileNotFoundError(f"cannot write {args.dst}: no directory {folder}")
        else:
            check_destination(args.dst)
    except (ValueError, OSError) as e:
        print(_line("convert", e), file=sys.stderr)
        return 2
    try:
        ckpt = read_checkpoint(args.src, args.source, block=args.block, config=config, prefix=args.prefix)
    except (ConfigError, WeightError, OSError, ImportError, ValueError) as e:
        print(_line("convert", e), file=sys.stderr)
        return 1
    if to_onnx:
        try:
            from .torch.onnx import export
            from .weights import build

            exported = export(build(ckpt, "torch"), args.dst, shape or (), return_attention=args.return_attention)
        except Exception as e:  # the shape, a block that does not export, a missing torch: one line
            print(
                _line("convert", e) if isinstance(e, ConfigError) else f"convert: {type(e).__name__}: {e}",
                file=sys.stderr,
            )
            return 1
        print(ckpt.summary())
        dynamic = ", ".join(f"{name} {axes}" for name, axes in exported.dynamic_axes.items()) or "none"
        print(f"wrote an ONNX graph to {args.dst} (input x {shape}; dynamic axes: {dynamic})")
        for note in exported.notes:
            print(f"  {note}")
        return 0
    try:
        fmt = write_checkpoint(ckpt, args.dst)
    except Exception as e:  # a full disk, a vanished directory, the writer's own errors: one line
        print(f"convert: cannot write {args.dst}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(ckpt.summary())
    print(f"wrote {len(ckpt.weights)} tensors to {args.dst} ({FORMATS[fmt][0]}); read it back with: {LOAD_HINTS[fmt]}")
    return 0


def _ints(command: str, option: str, text: str, count: int | None = None) -> tuple[int, ...] | None:
    """``"2,3,64,64"`` as integers; None (after one line on stderr) if it is not that."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count):
        want = f"{count} comma-separated integers" if count else "comma-separated integers"
        print(f"{command}: {option} expects {want}, got {text!r}", file=sys.stderr)
        return None
    return values


def _viz_block(args, config):
    """The block ``nlattn viz`` draws: a saved file, or a class name with its published init."""
    import os

    from .specs import CONFIGS
    from .weights import build
    from .weights.convert import read_checkpoint

    if args.block_file in CONFIGS and not os.path.exists(args.block_file):
        return build(args.block_file, args.framework, **config)
    ckpt = read_checkpoint(args.block_file, args.source, block=args.block, config=config, prefix=args.prefix)
    return build(ckpt, args.framework)


def _viz_input(args, spec):
    """(x (1, C, H, W) float64, what to show (H, W[, 3])) from a picture or a .npy (C, H, W) array."""
    import numpy as np

    from .errors import InputError
    from .viz import display_image

    size = spec.fixed_spatial_size or (_ints("viz", "--size", args.size, 2) if args.size else None)
    if args.image.lower().endswith(".npy"):
        x = np.load(args.image, allow_pickle=False).astype(np.float64)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[0] != 1:
            raise InputError(f"viz: a .npy input is one (C, H, W) array, got shape {x.shape}")
        if size is not None and tuple(x.shape[2:]) != tuple(size):
            raise InputError(f"viz: {spec.block} needs spatial size {tuple(size)}, the array has {x.shape[2:]}")
        return x, display_image(x[0])
    from PIL import Image

    channels = spec.expected_channels()
    if channels not in (None, 1, 3):
        raise InputError(
            f"viz: {spec.block} expects {channels} input channels and a picture has 1 or 3; "
            "give a .npy array (C, H, W) of features instead"
        )
    with Image.open(args.image) as picture:
        picture = picture.convert("L" if channels == 1 else "RGB")
        if size is not None:
            picture = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        img = np.asarray(picture, np.float64) / 255.0
    x = (img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0))[None]
    return x, img


def _viz(args) -> int:
    from .errors import ConfigError, InputError, WeightError
    from .viz import POSITIONAL, channel_map, codeword_maps, context_map, figure, matrix_figure, query_maps

    config = _config("viz", args.config)
    if config is None:
        return 2
    queries = []
    for text in args.query:
        q = _ints("viz", "--query", text, 2)
        if q is None:
            return 2
        queries.append(q)
    try:
        block = _viz_block(args, config)
        spec = block.spec
        if spec.spatial_dims != 2:
            raise ConfigError(f"viz: draws 2D inputs; for a {spec.block} use nlattn.viz.query_maps (arrays)")
        if spec.attention is None and spec.block != "NonLocalMeans":
            raise ConfigError(f"viz: {spec.block} has no attention map")
        x, shown = _viz_input(args, spec)
        per_query = spec.block in (*POSITIONAL, "CrissCrossAttention", "NonLocalMeans") or (
            spec.block == "RelationAwareAttention" and spec.use_spatial
        )
        if per_query and not queries:
            print(f"viz: {spec.block} draws one map per query: give --query Y,X (repeatable)", file=sys.stderr)
            return 2
        if per_query:
            fig = figure(shown, query_maps(block, x, queries)[0], queries)
        elif spec.block == "GlobalContext":
            fig = figure(shown, context_map(block, x)[:1], titles=["context pooling weights"])
        elif spec.block == "ExplicitVisualCenter":
            maps = codeword_maps(block, x)[0]
            fig = figure(shown, maps, titles=[f"codeword {k}" for k in range(len(maps))], ncols=8)
        else:
            fig = matrix_figure(channel_map(block, x)[0], title=f"{spec.block} (channel × channel)")
        fig.savefig(args.out, dpi=args.dpi)
    except (ConfigError, InputError, WeightError, OSError, ImportError, ValueError) as e:
        print(_line("viz", e), file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def _info(args) -> int:
    import os

    from .errors import ConfigError, InputError, WeightError
    from .info import info

    config = _config("info", args.config)
    shape = _ints("info", "--input", args.input)
    if config is None or shape is None:
        return 2
    try:
        block = args.block
        if block.lower().endswith(".safetensors") and os.path.exists(block):
            from .weights import load_file

            ckpt = load_file(block)
            block, config = ckpt.block, {**ckpt.config, **config}
        cost = info(block, shape, dtype=args.dtype, framework=args.framework, **config)
    except (ConfigError, InputError, WeightError, OSError, ValueError) as e:
        print(_line("info", e), file=sys.stderr)
        return 1
    print(cost.format())
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
        ".pt/.pth (torch state dict), .weights.h5 (Keras), .msgpack (Flax nnx state) "
        "or .onnx (the torch block's graph, with --input-shape)",
    )
    v.add_argument(
        "--source",
        help="published source naming: alexhex7, caffe2, timm, danet, sagan, "
        "ccnet, rga, cfpnet, mmcv, mmseg (default: SRC is already canonical)",
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
    v.add_argument("--input-shape", metavar="B,C,...", help="for an .onnx DST: the input shape to trace at")
    v.add_argument("--return-attention", action="store_true", help="for an .onnx DST: output the map as well")
    v.set_defaults(func=_convert)
    z = sub.add_parser("viz", help="draw a block's attention maps on an image (needs the viz extra: matplotlib)")
    z.add_argument(
        "block_file",
        metavar="BLOCK_FILE",
        help="a saved block (.safetensors from save_weights / convert; other files with --source or "
        "--block), or a block class name (published init, e.g. NonLocalBlock2D with --config mode=gaussian)",
    )
    z.add_argument(
        "image", metavar="IMAGE", help="a picture (PNG, JPEG, ... scaled to [0, 1]) or a .npy (C, H, W) array"
    )
    z.add_argument("--query", action="append", default=[], metavar="Y,X", help="a query pixel (repeatable)")
    z.add_argument("--out", required=True, help="the PNG to write")
    z.add_argument("--framework", default="torch", help="torch, tf (Keras) or jax (Flax) (default: torch)")
    z.add_argument("--size", metavar="H,W", help="resize the picture first (the naive map is N×M: keep it small)")
    z.add_argument("--source", help="published naming of BLOCK_FILE, as for nlattn convert")
    z.add_argument("--block", help="block class name when BLOCK_FILE holds canonical names without nlattn metadata")
    z.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help="constructor keyword (repeatable)"
    )
    z.add_argument("--prefix", help="key prefix of the block inside a bigger checkpoint (with --source)")
    z.add_argument("--dpi", type=int, default=100)
    z.set_defaults(func=_viz)
    n = sub.add_parser("info", help="parameters, FLOPs and peak memory of a block at an input shape")
    n.add_argument("block", metavar="BLOCK", help="block class name, or a saved .safetensors block")
    n.add_argument("--input", required=True, metavar="B,C,H,W", help="channels-first input shape")
    n.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help="constructor keyword (repeatable)"
    )
    n.add_argument("--dtype", default="float32", help="activation dtype: float32, float64, bfloat16, float16")
    n.add_argument("--framework", help="count the fast path's workspace of torch, tf (Keras) or jax (Flax)")
    n.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
