"""What only nlattn.torch has: state_dict names, torch.compile, the flash kernel, dtype handling.

Conformance, initialisation, weights and errors are checked for every framework alike in
tests/test_blocks.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import nlattn
import nlattn.torch as nt
from conftest import ONE_CASE_PER_BLOCK
from nlattn import InputError
from nlattn.conformance.cases import CASES
from nlattn.conformance.runner import error
from nlattn.numpy_ref import run as reference
from nlattn.specs import random_weights, tensors
from nlattn.torch import kernels

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1"

torch.set_float32_matmul_precision("highest")  # no TF32 (docs/design.md §5)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def build(block, config, dtype=torch.float32, seed=0, implementation="auto"):
    """A block in eval mode with random (non-identity) weights, and those weights (float64)."""
    m = getattr(nt, block)(**config, implementation=implementation).to(dtype).eval()
    w = random_weights(m.spec.schema(), np.random.default_rng(seed))
    nt.load_weights(m, w)
    return m, w


def rand(shape, dtype=torch.float32, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).to(dtype)


def numpy(t):
    return t.detach().double().numpy()


# ---------------------------------------------------------------------------------------------
# torch.compile (inductor) == eager == reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", list(ONE_CASE_PER_BLOCK))
def test_compile_matches_eager(block):
    case = ONE_CASE_PER_BLOCK[block]
    config = case.config
    m, w = build(block, config)
    x = rand(case.shape)
    compiled = torch.compile(m)  # default backend: inductor
    with torch.no_grad():
        eager, got = m(x), compiled(x)
    assert error(numpy(got), numpy(eager)) <= 1e-5
    assert error(numpy(got), reference(block, x.double().numpy(), w, config)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# init, names, weights
# ---------------------------------------------------------------------------------------------


def test_scale_init_and_forward():
    assert torch.equal(nt.Scale()(torch.ones(3)), torch.zeros(3))
    s = nt.Scale(init=0.5)
    assert torch.equal(s(torch.full((2, 2), 4.0)), torch.full((2, 2), 2.0))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_state_dict_is_the_schema(case):
    m = getattr(nt, case.block)(**case.config)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    want = {n: t.shape for n, t in tensors(case.spec.schema()).items()}
    assert got == want


# ---------------------------------------------------------------------------------------------
# input and config errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block, config, x, needle",
    [
        ("ChannelAttention", dict(in_channels=4), torch.zeros(2, 4, 3, 3, dtype=torch.bool), "bool"),
        ("CrissCrossAttention", dict(in_channels=8), np.zeros((2, 8, 3, 3), np.float32), "torch.Tensor"),
    ],
)
def test_torch_input_errors(block, config, x, needle):
    m = getattr(nt, block)(**config)
    with pytest.raises(InputError, match=block) as info:
        m(x)
    assert needle in str(info.value)


def test_repr_and_torch_keywords():
    with pytest.raises(TypeError):
        nt.Scale(0.0, 1.0)
    assert "implementation='naive'" in repr(nt.ChannelAttention(implementation="naive"))
    m = nt.NonLocalBlock2D(8, bn_eps=1e-3, bn_momentum=0.3, dtype=torch.float64)
    assert (m.bn.eps, m.bn.momentum) == (1e-3, 0.3)  # the spec's convention, torch's own meaning
    assert m.theta.weight.dtype == m.bn.running_var.dtype == torch.float64
    assert isinstance(m.bn, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pt")), ids=lambda p: p.stem)
def test_state_dicts_written_by_nlattn_0_1_load(path):
    ckpt = nlattn.load_file(path.with_suffix(".safetensors"))
    m = nt.BLOCKS[ckpt.block](**ckpt.config)
    result = m.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)  # .pt files omit them
    got = nt.export_weights(m)
    assert all(np.array_equal(got[k], v) for k, v in ckpt.weights.items())


# ---------------------------------------------------------------------------------------------
# fast paths (implementation="auto")
# ---------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (kernels' internal buffers are not seen)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


# N = M = 256 positions and few channels: an N×M tensor is far larger than any other
FAST = [
    ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False)),
    ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, mode="gaussian", num_heads=2)),
    ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, mode="dot_product", scale=0.5)),
    ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, mode="concatenation")),
    ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, share_query_key=True, value_channels=3)),
    ("SelfAttention", dict(in_channels=8)),
    ("PositionAttention", dict(in_channels=8, qk_ratio=2)),
    ("DisentangledNonLocal2D", dict(in_channels=4)),
]


@pytest.mark.parametrize(
    "block, config", FAST, ids=[f"{b}-{c.get('mode', 'embedded')}-{i}" for i, (b, c) in enumerate(FAST)]
)
def test_fast_path_never_materialises_the_relation(block, config, monkeypatch):
    """Neither the forward nor the backward (the training step's input and parameter gradients)."""
    n = 16 * 16
    # the chunked softmax attention's (heads, chunk, M) block: 16 rows here, as at N·M beyond its budget
    monkeypatch.setattr(nlattn.specs, "CHUNK_ELEMENTS", 16 * n)
    monkeypatch.setattr(nlattn.specs, "MIN_QUERY_CHUNK", 1)
    m, w = build(block, config)
    naive, _ = build(block, config, implementation="naive")
    x = rand((1, config["in_channels"], 16, 16))
    with torch.no_grad():
        with _LargestTensor() as fast:
            out = m(x)
        with _LargestTensor() as slow:
            naive(x)
    assert slow.numel >= n * n  # the check can fail: the naive path does build it
    assert fast.numel < n * n // 8
    assert error(numpy(out), reference(block, x.double().numpy(), w, config)) <= 1e-5
    for model, largest in ((m, fast), (naive, slow)):
        loss = model(x.clone().requires_grad_(True)).sum()
        largest.numel = 0
        with largest:
            loss.backward()
    assert slow.numel >= n * n
    assert fast.numel < n * n // 8


def test_criss_cross_stores_only_row_and_column_energies():
    m, w = build("CrissCrossAttention", dict(in_channels=8, qk_ratio=4))
    x = rand((1, 8, 12, 16))
    with torch.no_grad(), _LargestTensor() as seen:
        out = m(x)
    assert seen.numel <= 12 * 16 * (12 + 16)
    assert (
        error(numpy(out), reference("CrissCrossAttention", x.double().numpy(), w, dict(in_channels=8, qk_ratio=4)))
        <= 1e-5
    )


def test_criss_cross_backward_stores_only_row_and_column_energies():
    config = dict(in_channels=8, qk_ratio=4, recurrence=2)
    m, w = build("CrissCrossAttention", config)
    x = rand((1, 8, 12, 16)).requires_grad_(True)
    u = rand((1, 8, 12, 16), seed=2)
    with _LargestTensor() as seen:
        (m(x) * u).sum().backward()
    assert seen.numel <= 12 * 16 * (12 + 16)
    # the input gradient along a direction, against central differences of the float64 reference
    x64, d = x.detach().double().numpy(), rand((1, 8, 12, 16), seed=3).double().numpy()
    u64 = u.double().numpy()
    f = lambda t: float((reference("CrissCrossAttention", t, w, config) * u64).sum())  # noqa: E731
    expected = (f(x64 + 1e-5 * d) - f(x64 - 1e-5 * d)) / 2e-5
    assert abs(float((x.grad.double().numpy() * d).sum()) - expected) <= 1e-5 * max(1.0, abs(expected))


@pytest.mark.parametrize(
    "block, config",
    [
        ("NonLocalBlock2D", dict(in_channels=8)),
        ("NonLocalBlock2D", dict(in_channels=8, num_heads=2, share_query_key=True, bn_layer=False)),
        ("SelfAttention", dict(in_channels=8, qk_ratio=4)),
    ],
    ids=["embedded", "sharedqk-heads", "sagan"],
)
def test_softmax_blocks_stay_off_sdpa_on_the_cpu(block, config, monkeypatch):
    """On the CPU every softmax block takes the chunked kernel, forward and backward: SDPA's CPU
    kernel turns peaked rows into denormals (kernels.softmax_attention)."""

    def refuse(*args, **kwargs):
        raise AssertionError("SDPA called on the CPU")

    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", refuse)
    m, _ = build(block, config)
    x = rand((2, config["in_channels"], 5, 7)).requires_grad_(True)
    m(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("widths", [(6, 6), (2, 6), (6, 3)], ids=["equal", "narrow-qk", "narrow-v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_sdpa_path_is_the_materialised_one(widths, dtype):
    """The path other devices take (SDPA, the narrower widths zero-padded), here on SDPA's CPU
    flash kernel only (it raises if the inputs do not qualify): output and gradients against
    float64 autograd through the formed matrix, within §5's tolerance for the dtype."""
    c, cv = widths
    q, k, v = (t.detach() for t in _qkv(11, 9, c, cv))
    low = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    wide = [t.detach().double().requires_grad_(True) for t in low]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = kernels._flash_attention(*low, 0.7)
        got.sum().backward()
    want = _materialised(*wide, 0.7)
    want.sum().backward()
    tol = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2}[dtype]
    assert got.shape == want.shape and error(numpy(got), numpy(want)) <= tol
    for g, w in zip(low, wide):
        assert error(numpy(g.grad), numpy(w.grad)) <= tol


@pytest.mark.parametrize(
    "block, config",
    [
        ("SelfAttention", dict(in_channels=8, qk_ratio=4)),
        ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, mode="gaussian")),
        ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, mode="concatenation", bn_layer=False)),
    ],
    ids=["sagan", "gaussian", "concat"],
)
def test_fast_path_at_more_than_one_key_block(block, config):
    """N = M = 600 keys: more than one of the flash kernel's 512-key blocks (its running-max
    rescaling), and many queries per sorted-key search."""
    m, w = build(block, config)
    x = rand((2, config["in_channels"], 20, 30))
    with torch.no_grad():
        out = m(x)
    assert error(numpy(out), reference(block, x.double().numpy(), w, config)) <= 1e-5


def test_auto_and_naive_agree_with_attention_requested():
    m, _ = build("NonLocalBlock2D", dict(in_channels=8, mode="concatenation"))
    x = rand((2, 8, 5, 7))
    with torch.no_grad():
        fast = m(x)
        slow, attn = m(x, return_attention=True)  # needs the map: the materialising path
    assert attn.shape == (2, 35, 6)
    assert error(numpy(fast), numpy(slow)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# NonLocalMeans and EVC specifics
# ---------------------------------------------------------------------------------------------


def test_nl_means_gradient_does_not_change_the_value():
    m = nt.NonLocalMeans(patch_size=3, patch_distance=2, h=0.3)
    x = rand((2, 1, 8, 9), dtype=torch.float64)
    with torch.no_grad():
        plain = m(x)
    xg = x.clone().requires_grad_(True)
    out = m(xg)
    assert torch.equal(out.detach(), plain)  # bit for bit the fast_exp value
    out.sum().backward()
    assert torch.all(torch.isfinite(xg.grad)) and xg.grad.abs().sum() > 0
    assert (
        error(numpy(plain), reference("NonLocalMeans", x.numpy(), None, dict(patch_size=3, patch_distance=2, h=0.3)))
        <= 1e-12
    )


@pytest.mark.parametrize(
    "shape, config",
    [((2, 1, 13, 12), dict(patch_size=5, patch_distance=3, h=0.3)), ((1, 2, 9, 11), dict(h=0.4, sigma=0.1))],
    ids=["gray", "colour-sigma-bigpad"],
)
def test_nl_means_fast_mode_tiles_agree_with_the_reference(monkeypatch, shape, config):
    """fast_mode's tiled filter split into tiles of a few centre rows and single offsets
    (every tile boundary and offset group exercised) is still the float64 reference."""
    config = dict(config, fast_mode=True)
    x = torch.from_numpy(np.random.default_rng(4).random(shape))
    expected = reference("NonLocalMeans", x.numpy(), None, config)
    m = nt.NonLocalMeans(**config)
    c, cols = shape[0] * shape[1], shape[-1] + 2 * m.spec.patch_distance + m.spec.patch_size - 2
    for elements in (nt.NonLocalMeans.TILE_ELEMENTS, 2 * c * cols * m.spec.patch_size, c * cols * m.spec.patch_size):
        monkeypatch.setattr(nt.NonLocalMeans, "TILE_ELEMENTS", elements)
        with torch.no_grad():
            assert error(numpy(m(x)), expected) <= 1e-9


def test_criss_cross_gradients_are_the_finite_differences():
    """The criss-cross pass's own backward, for every input and for the attention as an output too."""
    from nlattn.torch.attention import criss_cross

    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 3, 4  # batch 2: the column layouts are copies (at batch 1 they are views)
    x, v = (torch.randn(b, h, w, 4, dtype=torch.float64, generator=g).requires_grad_(True) for _ in range(2))
    q, k = (torch.randn(b, h, w, 2, dtype=torch.float64, generator=g).requires_grad_(True) for _ in range(2))
    gamma = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    u = torch.randn(b, h, w, h + w, dtype=torch.float64, generator=g)
    inputs = (x, gamma, q, k, v)
    assert torch.autograd.gradcheck(lambda *a: criss_cross(*a)[0], inputs, fast_mode=True)
    loss = lambda *a: (lambda y, at: y.sum() + (at * u).sum())(*criss_cross(*a))  # noqa: E731
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


def test_evc_keeps_its_codebook_in_float32_under_bfloat16():
    m = nt.ExplicitVisualCenter(8, num_codes=4).to(torch.bfloat16)
    encoding = m.lvc.LVC[3]
    assert encoding.codewords.dtype == encoding.scale.dtype == torch.float32
    assert m.conv1.weight.dtype == m.lvc.LVC[4].running_var.dtype == torch.bfloat16
    assert m.double().lvc.LVC[3].scale.dtype == torch.float64


def test_missing_torch_names_the_extra():
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import nlattn.torch"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "pip install nlattn[torch]" in run.stderr


# ---------------------------------------------------------------------------------------------
# the chunked softmax attention (unequal widths): exact gradients, no (N, M) tensor, half precision
# ---------------------------------------------------------------------------------------------


def _materialised(q, k, v, scale):
    """softmax(scale·q kᵀ) v with the (N, M) matrix formed, in the inputs' dtype: autograd's own."""
    return torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1) @ v


def _qkv(n, m, c, cv, dtype=torch.float64, seed=2, heads=2):
    shapes = ((2, heads, n, c), (2, heads, m, c), (2, heads, m, cv))
    return [rand(s, dtype, seed + i).requires_grad_(True) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("chunk", [1, 4, 13, 64], ids=lambda c: f"chunk{c}")
def test_chunked_softmax_attention_is_the_materialised_one(chunk):
    """Output and dq, dk, dv against autograd through the formed matrix (float64): N = 13 queries
    in chunks of 1, 4 (a ragged last one), 13 and more than N."""
    q, k, v = _qkv(13, 7, 3, 5)
    d_out = rand((2, 2, 13, 5), torch.float64, seed=9)
    got = kernels.softmax_attention(q, k, v, 0.7, query_chunk_size=chunk)
    want = _materialised(q, k, v, 0.7)
    assert error(numpy(got), numpy(want)) <= 1e-12
    grads = torch.autograd.grad(got, (q, k, v), d_out)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), d_out)):
        assert error(numpy(g), numpy(w)) <= 1e-12


def test_chunked_softmax_attention_gradcheck():
    q, k, v = _qkv(5, 4, 2, 3, heads=1)
    assert torch.autograd.gradcheck(lambda *t: kernels.softmax_attention(*t, 0.5, query_chunk_size=2), (q, k, v))


def test_chunked_softmax_attention_has_no_second_derivative():
    q, k, v = _qkv(5, 4, 2, 3, heads=1)
    out = kernels.softmax_attention(q, k, v, query_chunk_size=2)
    with pytest.raises(RuntimeError, match="create_graph=True.*implementation='naive'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


@pytest.mark.parametrize(
    "block, config",
    [
        ("SelfAttention", dict(in_channels=8, qk_ratio=4)),
        ("PositionAttention", dict(in_channels=8, qk_ratio=2)),
        ("NonLocalBlock2D", dict(in_channels=4, mode="gaussian", num_heads=2)),
        ("NonLocalBlock2D", dict(in_channels=4, share_query_key=True, value_channels=6, scale=0.3)),
    ],
    ids=["sagan", "pam", "gaussian-heads", "sharedqk-values"],
)
def test_chunked_blocks_train_as_the_naive_ones(block, config, monkeypatch):
    """The training step (train mode, batch statistics) of the fast path equals the naive path's:
    output, input and parameter gradients, float64, with 5-query chunks (a ragged last one)."""
    monkeypatch.setattr(nlattn.specs, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(nlattn.specs, "MIN_QUERY_CHUNK", 5)
    x = rand((2, config["in_channels"], 4, 6), torch.float64)
    d_out = rand(x.shape, torch.float64, seed=3)
    results = []
    for implementation in ("auto", "naive"):
        m, _ = build(block, config, dtype=torch.float64, implementation=implementation)
        xg = x.clone().requires_grad_(True)
        out = m.train()(xg)
        (out * d_out).sum().backward()
        results.append([out, xg.grad, *(p.grad for p in m.parameters())])
    for fast, naive in zip(*results):
        assert error(numpy(fast), numpy(naive)) <= 1e-12


class _DenormalExp(TorchDispatchMode):
    """Counts the float32 denormals (0 < |p| < 1.2e-38) in every exp's result."""

    def __init__(self):
        super().__init__()
        self.denormals = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.exp.default, torch.ops.aten.exp_.default):
            tiny = torch.finfo(torch.float32).tiny
            self.denormals += int(((out != 0) & (out.abs() < tiny)).sum())
        return out


def test_chunked_softmax_attention_never_exponentiates_to_denormals():
    """Peaked rows (energies spread over ~2000, as gaussian mode's x·x over many channels gives):
    the float32 kernel equals float64 autograd through the formed matrix (output and gradients,
    §5's float32 tolerance), and no exp in forward or backward returns a float32 denormal (x86
    computes with those ~100× slower)."""
    q, k, v = (t.detach() for t in _qkv(40, 24, 8, 16, dtype=torch.float32))
    q = 30 * q
    q32, k32, v32 = (t.clone().requires_grad_(True) for t in (q, k, v))
    wide = [t.double().requires_grad_(True) for t in (q, k, v)]
    d_out = rand((2, 2, 40, 16), torch.float64, seed=9)
    with _DenormalExp() as mode:
        got = kernels.softmax_attention(q32, k32, v32, query_chunk_size=16)
        got.backward(d_out.float())
    want = _materialised(*wide, 1.0)
    want.backward(d_out)
    assert float(torch.softmax(wide[0] @ wide[1].transpose(-1, -2), -1).detach().min()) < 1e-38  # the rows peak
    assert mode.denormals == 0
    assert error(numpy(got), numpy(want)) <= 1e-5
    for g, w in zip((q32, k32, v32), wide):
        assert error(numpy(g.grad), numpy(w.grad)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_chunked_softmax_attention_in_half_precision(dtype):
    """Half inputs, float32 energies: |q·k| up to ~1e5 (beyond float16's 65504) stays finite, and
    the output and gradients are within §5's half-precision tolerance of float64 on the same
    (rounded) inputs."""
    q, k, v = (t.detach() for t in _qkv(40, 24, 4, 16, dtype=torch.float32))
    q, k = 100 * q, 100 * k
    half = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    wide = [t.detach().double().requires_grad_(True) for t in half]
    d_out = rand((2, 2, 40, 16), torch.float64, seed=9)
    got = kernels.softmax_attention(*half, 0.1, query_chunk_size=16)
    want = _materialised(*wide, 0.1)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert error(numpy(got), numpy(want)) <= 2e-2
    got.backward(d_out.to(dtype))
    want.backward(d_out)
    for h, w in zip(half, wide):
        assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()
        assert error(numpy(h.grad), numpy(w.grad)) <= 2e-2
