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
]


@pytest.mark.parametrize(
    "block, config", FAST, ids=[f"{b}-{c.get('mode', 'embedded')}-{i}" for i, (b, c) in enumerate(FAST)]
)
def test_fast_path_never_materialises_the_relation(block, config):
    m, w = build(block, config)
    x = rand((1, config["in_channels"], 16, 16))
    n = 16 * 16
    with torch.no_grad():
        with _LargestTensor() as fast:
            out = m(x)
        naive, _ = build(block, config, implementation="naive")
        with _LargestTensor() as slow:
            naive(x)
    assert slow.numel >= n * n  # the check can fail: the naive path does build it
    assert fast.numel < n * n // 8
    assert error(numpy(out), reference(block, x.double().numpy(), w, config)) <= 1e-5


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


@pytest.mark.parametrize(
    "block, config",
    [
        ("NonLocalBlock2D", dict(in_channels=8)),
        ("NonLocalBlock2D", dict(in_channels=8, mode="gaussian", num_heads=4, sub_sample=False)),
        ("NonLocalBlock2D", dict(in_channels=8, share_query_key=True, value_channels=6, bn_layer=False)),
        ("SelfAttention", dict(in_channels=16)),
        ("PositionAttention", dict(in_channels=8, qk_ratio=2)),
    ],
    ids=["embedded", "gaussian-heads", "sharedqk", "sagan", "pam"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_softmax_blocks_run_the_flash_kernel(block, config, dtype):
    """Only the CPU flash kernel is allowed: SDPA raises if its inputs do not qualify for it."""
    m, _ = build(block, config, dtype=dtype)
    x = rand((2, config["in_channels"], 5, 7), dtype=dtype).requires_grad_(True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        m(x).sum().backward()
    assert x.grad is not None


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
