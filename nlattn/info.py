"""What a block costs before it goes into a model (parameters, FLOPs, peak activation memory), and
what the residual gates of a model hold while it trains (``gates``).

``info(block, input_shape, **config)`` (and ``nlattn info BLOCK --input B,C,H,W``) reports, for
the channels-first input shape given:

* **parameters**: trainable tensors of the spec's schema (``nlattn.specs``), and **buffers** (the
  BatchNorm running statistics), element counts. They equal torch's ``parameters()`` / ``buffers()``
  (without ``num_batches_tracked``), Keras' trainable / non-trainable weights and Flax's
  ``nnx.Param`` / ``nnx.BatchStat`` leaves.
* **FLOPs** of one forward pass on the naive (materialising) and on the fast path (docs/design.md
  §6), dominant terms only, as ``benchmarks/bench.py`` counts them: a multiply-add is 2 FLOPs in
  convolutions, dense layers and the relation / aggregation contractions; softmax, pooling,
  normalisation, activations and residual adds are left out. Two exceptions that dominate their
  block: EVC's codeword distances Σ(x − d)² (3 FLOPs per element) and non-local means' patch
  distances.
* **peak activation memory** (bytes, beyond the parameters) of both paths, for an inference forward
  (no gradients) and a training step (forward, then backward of a scalar loss). The block's forward
  is written down as the sequence of tensors it creates (the float64 reference's formulation, which
  every framework follows), and tensors are freed after their last use, as an eager framework frees
  them: the forward peak is the largest set alive at once. A training step keeps what autograd saves
  for backward (every intermediate except those only an elementwise op that saves its output reads,
  e.g. the energies before a softmax), and its backward holds the gradient of the output of the op
  it is at and of that op's inputs; parameter gradients are added. Framework workspaces are not
  counted unless ``framework`` is given: then the Keras / Flax chunked softmax holds one chunk's
  ``query_chunk_size`` × M relation (and its exponentials), torch's (on the CPU) one
  (batch·heads, chunk, M) block of about ``specs.CHUNK_ELEMENTS`` elements (docs/design.md §6).
* **auto**: the path ``implementation="auto"`` takes without ``return_attention`` — the fast one
  where the block has one (the same rule in every framework, docs/design.md §2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError
from .specs import BlockConfig, Gate, config_class, make_config, query_chunk, tensors

#: tensor kinds counted as buffers, not trainable parameters
STATISTICS = ("bn_mean", "bn_var")

_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Cost:
    """The cost report of one block at one input shape (see the module docstring)."""

    block: str
    config: dict[str, Any]
    input_shape: tuple[int, ...]
    dtype: str
    parameters: int
    buffers: int
    flops: dict[str, int]  # path ("naive", "fast") -> FLOPs of one forward
    memory: dict[str, dict[str, int]]  # path -> {"forward": bytes, "train": bytes}
    auto: str  # the path implementation="auto" takes: "fast" or "naive"
    fast_path: bool  # whether the block has a path of its own that never forms its relation

    def format(self) -> str:
        """A short human-readable report (what ``nlattn info`` prints)."""
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        lines = [
            f"{self.block}({cfg})",
            f"input {tuple(self.input_shape)} {self.dtype} (channels-first)",
            f"parameters      {self.parameters:,}"
            + (f"  (+ {self.buffers:,} running statistics)" if self.buffers else ""),
            "",
            "| path | GFLOPs forward | peak MiB forward | peak MiB training step |",
            "|---|---|---|---|",
        ]
        paths = ("naive", "fast") if self.fast_path else ("naive",)
        for p in paths:
            mem = self.memory[p]
            lines.append(
                f"| {p} | {self.flops[p] / 1e9:.3g} | {mem['forward'] / 2**20:.1f} | {mem['train'] / 2**20:.1f} |"
            )
        why = "its fast path" if self.fast_path else "the naive path (the block has no fast path)"
        lines += ["", f'implementation="auto" takes {why}; return_attention=True always takes the naive path']
        return "\n".join(lines)


def gates(model) -> dict[str, float]:
    """Every residual gate γ in a torch / Keras / Flax model (or block): {canonical name: value}.

    The gates are the schema's ``Gate`` tensors (SelfAttention, PositionAttention,
    ChannelAttention and CrissCrossAttention γ, a ``Scale`` sublayer in Keras) and the γ of every
    ``Scale`` block; names are the canonical ones, prefixed by the block's path in the model
    (``layer3.attn.gamma``), as ``export_weights`` names them. Only the gates are read.
    """
    import importlib

    from .weights.access import join
    from .weights.frameworks import backend, framework_of

    fw = framework_of(model)
    backend(fw)  # an ImportError naming the extra
    access = importlib.import_module(f"nlattn.{fw}._weights").ACCESS
    out = {}
    for path, block in access.blocks(model):
        names = [layer.name for layer in block.spec.schema() if isinstance(layer, Gate) or block.spec.block == "Scale"]
        if names:
            live = access.variables(block)
            for name in names:
                out[join(path, name)] = float(np.asarray(access.read(live[name])).reshape(-1)[0])
    return out


def parameter_count(spec: BlockConfig) -> tuple[int, int]:
    """(trainable parameters, running statistics) of a config: element counts from its schema."""
    params = buffers = 0
    for t in tensors(spec.schema()).values():
        n = math.prod(t.shape)
        if t.kind in STATISTICS:
            buffers += n
        else:
            params += n
    return params, buffers


def info(
    block,
    input_shape: Sequence[int],
    *,
    dtype: str = "float32",
    framework: str | None = None,
    query_chunk_size: int | None = None,
    **config,
) -> Cost:
    """The cost of ``block`` on a channels-first ``input_shape`` (B, C, *S).

    ``block``: a block class name (then ``config`` gives its keywords; ``in_channels`` and RGA's
    ``spatial_size`` default to the input's), a config, or a block of any framework (its
    ``spec``). ``dtype``: the activations' dtype (bytes per element).
    ``framework`` ('torch', 'tf', 'jax' or None): count that framework's fast-path workspace;
    ``query_chunk_size`` (Keras / Flax, default 1024) the queries per chunk there.
    """
    from .specs import DEFAULT_QUERY_CHUNK_SIZE
    from .weights.frameworks import FRAMEWORKS

    shape = tuple(int(s) for s in input_shape)
    spec = _spec(block, config, shape)
    fw = None if framework is None else FRAMEWORKS.get(str(framework).lower())
    if framework is not None and fw is None:
        raise ConfigError(f"info: unknown framework {framework!r}; use 'torch', 'tf' (Keras) or 'jax' (Flax)")
    workspace = _Workspace(
        chunk=(query_chunk_size or DEFAULT_QUERY_CHUNK_SIZE) if fw in ("tf", "jax") else None,
        torch_chunks=fw == "torch",
    )
    spec.check_input_shape(shape)
    if dtype not in _BYTES:
        raise ConfigError(f"info: dtype must be one of {sorted(_BYTES)}, got {dtype!r}")
    if spec.block not in _GRAPHS:
        raise ConfigError(f"info: {spec.block} has no cost model yet (nlattn/info.py); known: {sorted(_GRAPHS)}")
    params, buffers = parameter_count(spec)
    bytes_ = _BYTES[dtype]
    flops, memory = {}, {}
    paths = ("naive", "fast") if spec.fast_path else ("naive",)
    for path in paths:
        graph = _Graph(shape)
        _GRAPHS[spec.block](graph, spec, shape, path == "fast", workspace)
        flops[path] = graph.flops
        memory[path] = {
            "forward": graph.forward_peak() * bytes_,
            "train": graph.train_peak() * bytes_ + params * bytes_,
        }
    if not spec.fast_path:  # one path: "fast" is the same computation
        flops["fast"], memory["fast"] = flops["naive"], memory["naive"]
    return Cost(
        spec.block,
        spec.to_dict(),
        shape,
        dtype,
        params,
        buffers,
        flops,
        memory,
        "fast" if spec.fast_path else "naive",
        spec.fast_path,
    )


def _spec(block, config, shape: tuple[int, ...]) -> BlockConfig:
    if isinstance(block, BlockConfig):
        return block.replace(**config) if config else block
    if isinstance(block, str):
        # what the input shape says need not be repeated: in_channels, RGA's spatial_size
        fields = config_class(block).__dataclass_fields__
        implied = {"in_channels": shape[1] if len(shape) > 1 else None, "spatial_size": tuple(shape[2:])}
        return make_config(block, **{k: v for k, v in implied.items() if k in fields and k not in config}, **config)
    spec = getattr(block, "spec", None)
    if isinstance(spec, BlockConfig):
        return spec.replace(**config) if config else spec
    raise TypeError(f"info: expected a block name, a config or an nlattn block, got {type(block).__name__}")


# --------------------------------------------------------------------------------------------
# A block's forward as the tensors it creates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Workspace:
    """What a framework's fast softmax path holds besides the block's tensors."""

    chunk: int | None = None  # Keras / Flax: queries per chunk of the relation
    torch_chunks: bool = False  # torch: queries per chunk by specs.query_chunk


@dataclass
class _Op:
    size: int  # elements of the tensor it creates
    inputs: tuple[int, ...]  # tensor ids read
    saved: bool  # kept for backward in a training step
    workspace: int  # elements it needs only while it runs
    last_use: int = -1


@dataclass
class _Graph:
    input_shape: tuple[int, ...]
    ops: list[_Op] = field(default_factory=list)
    flops: int = 0

    def __post_init__(self):
        self.ops.append(_Op(math.prod(self.input_shape), (), True, 0))  # tensor 0: the input x

    def op(self, size: int, *inputs: int, flops: int = 0, saved: bool = True, workspace: int = 0) -> int:
        """A new tensor of ``size`` elements computed from ``inputs``; its id."""
        self.flops += int(flops)
        self.ops.append(_Op(int(size), inputs, saved, int(workspace)))
        i = len(self.ops) - 1
        for j in inputs:
            self.ops[j].last_use = i
        return i

    def forward_peak(self) -> int:
        """Largest set of tensors alive at once when each is freed after its last use; the input
        (held by the caller) and the output stay."""
        live, peak = self.ops[0].size, 0
        for i, op in enumerate(self.ops[1:], 1):
            live += op.size
            peak = max(peak, live + op.workspace)
            for j in set(op.inputs):
                if j != 0 and self.ops[j].last_use == i:
                    live -= self.ops[j].size
        return max(peak, live)

    def train_peak(self) -> int:
        """Forward keeping every saved tensor, then backward op by op: the saved tensors of the ops
        not yet differentiated, the gradient of the op's output and of its inputs."""
        saved = [op.size if op.saved else 0 for op in self.ops]
        peak, live = 0, self.ops[0].size
        for i, op in enumerate(self.ops[1:], 1):
            live += op.size
            peak = max(peak, live + op.workspace)
            for j in set(op.inputs):
                if j != 0 and not self.ops[j].saved and self.ops[j].last_use == i:
                    live -= self.ops[j].size
        prefix = np.cumsum(saved)
        for i in range(len(self.ops) - 1, 0, -1):
            op = self.ops[i]
            grads = op.size + sum(self.ops[j].size for j in set(op.inputs))
            peak = max(peak, int(prefix[i]) + grads + op.workspace)
        return peak


def _conv(g: _Graph, x: int, positions: int, cin: int, cout: int, k: int = 1, groups: int = 1) -> int:
    return g.op(positions * cout, x, flops=2 * positions * cin // groups * cout * k)


def _non_local(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, *spatial = shape
    n = b * math.prod(spatial)
    window = cfg.pool_window if cfg.sub_sample else (1,) * len(spatial)
    m = b * math.prod(s // p for s, p in zip(spatial, window))
    ck, cv, h = cfg.embed_channels, cfg.value_width, cfg.num_heads
    x = 0

    def pool(t, width):
        return g.op(m * width, t) if cfg.sub_sample else t

    x_pooled = pool(x, c) if cfg.pool_first or cfg.mode == "gaussian" else x  # x: not used

    def embed(cout):  # conv then pool, or pool then conv
        return _conv(g, x_pooled, m, c, cout) if cfg.pool_first else pool(_conv(g, x, n, c, cout), cout)

    if cfg.mode == "gaussian":
        theta, phi = x, x_pooled
    else:
        theta = _conv(g, x, n, c, ck)
        if cfg.share_query_key:
            phi = _conv(g, x_pooled, m, c, ck) if cfg.pool_first else pool(theta, ck)
        else:
            phi = embed(ck)
    v = embed(cv)
    per_query = n // b  # relation entries per batch item: N·M
    nm = b * per_query * (m // b)
    if not fast:
        if cfg.mode == "concatenation":
            pairs = g.op(nm * 2 * ck, theta, phi)  # [θᵢ; φⱼ] for every pair
            e = g.op(nm, pairs, flops=2 * nm * 2 * ck, saved=False)
            attn = g.op(nm, g.op(nm, e))  # ReLU (saves its output), then / M
        else:
            e = g.op(h * nm, theta, phi, flops=2 * nm * ck, saved=False)
            if cfg.scale is not None:
                e = g.op(h * nm, e, saved=False)
            attn = g.op(h * nm, e)  # softmax (saves its output), or / M
        y = g.op(n * cv, attn, v, flops=2 * nm * cv)
    elif cfg.mode == "dot_product":
        kv = g.op(b * ck * cv // h, phi, v, flops=2 * m * ck * cv // h)
        y = g.op(n * cv, theta, kv, flops=2 * n * ck * cv // h)
    elif cfg.mode == "concatenation":
        a = g.op(n, theta, flops=2 * n * ck)
        k = g.op(m, phi, flops=2 * m * ck)
        sums = g.op(2 * m * cv + m, k, v, flops=3 * m * cv)  # sorted keys: prefix sums of g and k·g
        y = g.op(n * cv, a, sums, flops=2 * n * cv)
    else:  # softmax attention, queries tiled (or chunked: one chunk's relation at a time)
        y = _softmax_attention(g, ws, b, n, m, ck, cv, h, (theta, phi, v), 2 * nm * (ck + cv))
    y = g.op(n * cv, y)  # heads merged back: (B, Cv, *S)
    z = _conv(g, y, n, cv, c)
    if cfg.bn_layer:
        z = g.op(n * c, z)
    g.op(n * c, z, x, saved=False)


def _softmax_attention(g: _Graph, ws: _Workspace, b, n, m, ck, cv, h, qkv, flops) -> int:
    """The fast softmax path's output (N·Cv), with the framework's workspace."""
    chunk = query_chunk(h * b, m // b) if ws.torch_chunks else ws.chunk
    work = 2 * h * b * min(chunk, n // b) * (m // b) if chunk else 0  # energies and exponentials (or dS)
    return g.op(n * cv, *qkv, flops=flops, workspace=work)


def _qkv(g: _Graph, x: int, n: int, c: int, cq: int) -> tuple[int, int, int]:
    return _conv(g, x, n, c, cq), _conv(g, x, n, c, cq), _conv(g, x, n, c, c)


def _gated(g: _Graph, out: int, x: int, size: int) -> int:
    return g.op(size, g.op(size, out), x, saved=False)  # γ·out, + x


def _sagan(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, hh, ww = shape
    per, cq = hh * ww, cfg.qk_channels
    n, nn_ = b * per, b * per * per
    q, k, v = _qkv(g, 0, n, c, cq)
    if fast:
        out = _softmax_attention(g, ws, b, n, n, cq, c, 1, (q, k, v), 2 * nn_ * (cq + c))
    else:
        e = g.op(nn_, q, k, flops=2 * nn_ * cq, saved=False)
        attn = g.op(nn_, e)
        out = g.op(n * c, attn, v, flops=2 * nn_ * c)
    _gated(g, out, 0, n * c)


def _channel(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, *spatial = shape
    n = b * math.prod(spatial)
    e = g.op(b * c * c, 0, flops=2 * n * c * c, saved=False)
    attn = g.op(b * c * c, g.op(b * c * c, e, saved=False))  # max − E, softmax
    out = g.op(n * c, attn, 0, flops=2 * n * c * c)
    _gated(g, out, 0, n * c)


def _criss_cross(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, hh, ww = shape
    n, cq, x = b * hh * ww, cfg.qk_channels, 0
    for _ in range(cfg.recurrence):
        q, k, v = _qkv(g, x, n, c, cq)
        e_col = g.op(n * hh, q, k, flops=2 * n * hh * cq, saved=False)
        e_row = g.op(n * ww, q, k, flops=2 * n * ww * cq, saved=False)
        attn = g.op(n * (hh + ww), g.op(n * (hh + ww), e_col, e_row, saved=False))
        col = g.op(n * c, attn, v, flops=2 * n * hh * c)
        row = g.op(n * c, attn, v, flops=2 * n * ww * c)
        x = _gated(g, g.op(n * c, col, row, saved=False), x, n * c)


def _rga(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, hh, ww = shape
    per, ci, ni = hh * ww, cfg.inter_channel, cfg.inter_spatial
    n, x = b * per, 0

    def cbr(t, positions, cin, cout):
        return g.op(positions * cout, g.op(positions * cout, _conv(g, t, positions, cin, cout)))

    def gate(t, positions, cin):
        mid = cin // cfg.down_ratio
        return g.op(positions, _conv(g, cbr(t, positions, cin, mid), positions, mid, 1))

    if cfg.use_spatial:
        theta, phi = cbr(x, n, c, ci), cbr(x, n, c, ci)
        rel = g.op(b * per * per, theta, phi, flops=2 * b * per * per * ci)
        joint = g.op(2 * b * per * per, rel)
        feat = g.op(n * (1 + ni), g.op(n, cbr(x, n, c, ci)), cbr(joint, n, 2 * per, ni))
        x = g.op(n * c, g.op(n, gate(feat, n, 1 + ni)), x)
    if cfg.use_channel:
        pc = b * c  # channels as positions, positions as channels
        xc = g.op(n * c, x)
        theta, phi = cbr(xc, pc, per, ni), cbr(xc, pc, per, ni)
        rel = g.op(b * c * c, theta, phi, flops=2 * b * c * c * ni)
        joint = g.op(2 * b * c * c, rel)
        feat = g.op(pc * (1 + ci), g.op(pc, cbr(xc, pc, per, ni)), cbr(joint, pc, 2 * c, ci))
        x = g.op(n * c, g.op(pc, gate(feat, pc, 1 + ci)), x)


def _evc(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, hh, ww = shape
    n, q, k, r = b * hh * ww, c // 4, cfg.num_codes, cfg.mlp_ratio

    def cb(t, cin, cout, kk=1, groups=1):  # conv + BN
        return g.op(n * cout, _conv(g, t, n, cin, cout, kk, groups))

    def act(t, size):
        return g.op(size, t)

    stem = g.op(n * c, act(cb(0, c, c, 49), n * c))  # 7×7 conv, BN, ReLU, 3×3 max-pool
    t = act(cb(stem, c, q), n * q)
    t = act(cb(t, q, q, 9), n * q)
    local = act(g.op(n * c, cb(t, q, c), cb(stem, c, c), saved=False), n * c)
    feat = act(cb(local, c, c), n * c)
    resid = g.op(n * k * c, feat)  # x − d_k for every position and code
    dist = g.op(n * k, resid, flops=3 * n * k * c, saved=False)
    assign = g.op(n * k, g.op(n * k, dist))  # s_k·‖x − d_k‖², softmax over codes
    encoded = g.op(b * k * c, assign, resid, flops=2 * n * k * c)
    gate = g.op(b * c, g.op(b * c, g.op(b * k * c, encoded)), flops=2 * b * c * c)  # BN, mean, fc
    lvc = act(g.op(n * c, local, gate), n * c)
    dw = act(cb(g.op(n * c, stem), c, c, 1, c), n * c)
    dw = act(cb(dw, c, c), n * c)
    mlp = g.op(n * c, stem, g.op(n * c, dw), saved=False)
    hidden = act(_conv(g, g.op(n * c, mlp), n, c, r * c), n * r * c)
    mlp = g.op(n * c, mlp, g.op(n * c, _conv(g, hidden, n, r * c, c)), saved=False)
    _conv(g, g.op(2 * n * c, lvc, mlp), n, 2 * c, c)


def _nl_means(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, hh, ww = shape
    s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
    n, padded_n = b * hh * ww, b * (hh + 2 * o) * (ww + 2 * o)
    padded = g.op(padded_n * c, 0)
    num, den = g.op(n * c, padded), g.op(n, padded)
    for di in range(-min(d, hh - 1), min(d, hh - 1) + 1):
        for dj in range(-min(d, ww - 1), min(d, ww - 1) + 1):
            rows = b * (hh - abs(di)) * (ww - abs(dj))  # centres whose candidate is in the image
            sq = g.op(padded_n, padded, flops=3 * padded_n * c)
            partial = g.op(rows * s, sq, flops=2 * rows * s * s)
            weight = g.op(rows, partial)
            num = g.op(n * c, num, weight, flops=2 * rows * c, saved=False)
            den = g.op(n, den, weight, saved=False)
    g.op(n * c, num, den, saved=False)


def _disentangled(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, *spatial = shape
    per, ci = math.prod(spatial), cfg.inter
    n, x = b * per, 0
    theta, phi, v = (_conv(g, x, n, c, ci) for _ in range(3))
    theta, phi = g.op(n * ci, theta), g.op(n * ci, phi)  # minus their means over positions
    if fast:
        y = _softmax_attention(g, ws, b, n, n, ci, ci, 1, (theta, phi, v), 4 * b * per * per * ci)
    else:
        e = g.op(b * per * per, theta, phi, flops=2 * b * per * per * ci, saved=False)
        attn = g.op(b * per * per, g.op(b * per * per, e, saved=False))  # scaled, softmax
        y = g.op(n * ci, attn, v, flops=2 * b * per * per * ci)
    mask = g.op(n, _conv(g, x, n, c, 1))  # softmax over positions
    u = g.op(b * ci, mask, v, flops=2 * n * ci)
    z = _conv(g, y, n, ci, c)
    zu = _conv(g, u, b, ci, c)
    if cfg.bn_layer:
        z, zu = g.op(n * c, z), g.op(b * c, zu)
    g.op(n * c, g.op(n * c, z, zu, saved=False), x, saved=False)


def _global_context(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    b, c, *spatial = shape
    n, ci, x = b * math.prod(spatial), cfg.inter, 0
    if cfg.pooling_type == "att":
        mask = g.op(n, _conv(g, x, n, c, 1))  # softmax over positions
        context = g.op(b * c, mask, x, flops=2 * n * c)
    else:
        context = g.op(b * c, x)
    out = x
    for _ in cfg.branches:  # conv, LayerNorm, ReLU, conv on the (B, C) context
        t = g.op(b * ci, g.op(b * ci, _conv(g, context, b, c, ci)))
        out = g.op(n * c, out, _conv(g, t, b, ci, c), saved=False)
    if out == x:  # pragma: no cover - validate() requires a branch
        raise ConfigError(f"{cfg.block}: no fusion branch")


def _scale(g: _Graph, cfg, shape, fast: bool, ws: _Workspace) -> None:
    g.op(math.prod(shape), 0, flops=math.prod(shape), saved=False)


_GRAPHS = {
    "NonLocalBlock1D": _non_local,
    "NonLocalBlock2D": _non_local,
    "NonLocalBlock3D": _non_local,
    "SelfAttention": _sagan,
    "PositionAttention": _sagan,
    "ChannelAttention": _channel,
    "CrissCrossAttention": _criss_cross,
    "RelationAwareAttention": _rga,
    "ExplicitVisualCenter": _evc,
    "NonLocalMeans": _nl_means,
    "Scale": _scale,
    "GlobalContext": _global_context,
    "DisentangledNonLocal1D": _disentangled,
    "DisentangledNonLocal2D": _disentangled,
    "DisentangledNonLocal3D": _disentangled,
}

__all__ = ["Cost", "gates", "info", "parameter_count"]
