"""nlattn.torch: every block against the float64 reference, its weights, its errors, its fast paths.

The conformance jobs run twice: ``TorchAdapter`` (``implementation="auto"``, the fast paths) and
``TorchNaiveAdapter`` (the materialising paths). Everything else checks facts that hold exactly
(identity at init, names, bit-exact round trips, atomic loading) or compares with the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import nlattn
import nlattn.torch as nt
from nlattn import ConfigError, InputError, WeightError, make_config
from nlattn.conformance.cases import CASES
from nlattn.conformance.runner import error, jobs, run_check
from nlattn.numpy_ref import run as reference
from nlattn.specs import Param, random_weights, tensors
from nlattn.torch.conformance import TorchAdapter, TorchNaiveAdapter

torch.set_float32_matmul_precision("highest")   # no TF32 (DESIGN §5)

AUTO, NAIVE = TorchAdapter(), TorchNaiveAdapter()


def _job_id(prefix):
    return lambda job: f"{prefix}{job[0].id}-{job[2]}-{job[1]}"


@pytest.mark.parametrize("case, dtype, check", jobs(AUTO), ids=list(map(_job_id(""), jobs(AUTO))))
def test_conformance(case, dtype, check):
    result = run_check(AUTO, case, dtype, check)
    assert result.passed, result.describe()


@pytest.mark.parametrize("case, dtype, check", jobs(NAIVE),
                         ids=list(map(_job_id("naive-"), jobs(NAIVE))))
def test_conformance_naive(case, dtype, check):
    result = run_check(NAIVE, case, dtype, check)
    assert result.passed, result.describe()


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


#: one small config per block class (what torch.compile and the model tests use)
ONE_PER_CLASS = {
    "NonLocalBlock1D": (dict(in_channels=6, mode="concatenation"), (2, 6, 7)),
    "NonLocalBlock2D": (dict(in_channels=8), (2, 8, 5, 7)),
    "NonLocalBlock3D": (dict(in_channels=4, mode="dot_product"), (2, 4, 2, 4, 5)),
    "SelfAttention": (dict(in_channels=16), (2, 16, 5, 7)),
    "PositionAttention": (dict(in_channels=8, qk_ratio=2), (2, 8, 3, 5)),
    "ChannelAttention": (dict(), (2, 6, 5, 7)),
    "CrissCrossAttention": (dict(in_channels=8, qk_ratio=4, recurrence=2), (2, 8, 4, 5)),
    "RelationAwareAttention": (dict(in_channels=16, spatial_size=(4, 5), cha_ratio=2, spa_ratio=4,
                                    down_ratio=2), (2, 16, 4, 5)),
    "ExplicitVisualCenter": (dict(in_channels=8, num_codes=8), (2, 8, 5, 6)),
    "NonLocalMeans": (dict(patch_size=3, patch_distance=1, h=0.3), (2, 1, 6, 7)),
    "Scale": (dict(init=0.5), (2, 3, 4)),
}


def test_one_config_per_class():
    assert set(ONE_PER_CLASS) == set(nlattn.BLOCKS)


# ---------------------------------------------------------------------------------------------
# torch.compile (inductor) == eager == reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", sorted(ONE_PER_CLASS))
def test_compile_matches_eager(block):
    config, shape = ONE_PER_CLASS[block]
    m, w = build(block, config)
    x = rand(shape)
    compiled = torch.compile(m)        # default backend: inductor
    with torch.no_grad():
        eager, got = m(x), compiled(x)
    assert error(numpy(got), numpy(eager)) <= 1e-5
    assert error(numpy(got), reference(block, x.double().numpy(), w, config)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# init, names, weights
# ---------------------------------------------------------------------------------------------

IDENTITY_AT_INIT = [
    ("NonLocalBlock2D", dict(in_channels=8), (2, 8, 5, 7)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="concatenation", bn_layer=False), (2, 8, 5, 7)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="gaussian", num_heads=2), (2, 8, 4, 4)),
    ("NonLocalBlock1D", dict(in_channels=4, mode="dot_product", bn_layer=False), (2, 4, 9)),
    ("NonLocalBlock3D", dict(in_channels=4), (2, 4, 2, 4, 4)),
    ("SelfAttention", dict(in_channels=16), (2, 16, 3, 5)),
    ("PositionAttention", dict(in_channels=16), (2, 16, 3, 5)),
    ("ChannelAttention", dict(), (2, 6, 3, 5)),
    ("CrissCrossAttention", dict(in_channels=16, recurrence=2), (2, 16, 3, 5)),
]


@pytest.mark.parametrize("block, config, shape", IDENTITY_AT_INIT,
                         ids=[f"{b}-{i}" for i, (b, _, _) in enumerate(IDENTITY_AT_INIT)])
def test_identity_at_init(block, config, shape):
    torch.manual_seed(0)
    m = getattr(nt, block)(**config).eval()
    x = rand(shape)
    with torch.no_grad():
        assert torch.equal(m(x), x)
        m.train()
        assert torch.equal(m(x), x)


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
    # constant inits given by the schema (gamma = 0, EVC layer scales, Scale's init)
    params = dict(m.named_parameters())
    for layer in case.spec.schema():
        if isinstance(layer, Param) and layer.init is not None:
            assert torch.all(params[layer.name] == layer.init), layer.name
    assert m.spec == case.spec


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_export_load_export_is_bit_exact(case):
    m, _ = build(case.block, case.config, seed=case.seed)
    first = nt.export_weights(m)
    assert list(first) == list(tensors(case.spec.schema()))     # schema order
    assert all(v.dtype == np.float32 for v in first.values())
    fresh = getattr(nt, case.block)(**case.config)
    nt.load_weights(fresh, first)
    second = nt.export_weights(fresh)
    assert list(second) == list(first)
    for k in first:
        assert first[k].tobytes() == second[k].tobytes(), k


def test_framework_neutral_api_dispatches_to_torch():
    m, _ = build("SelfAttention", dict(in_channels=8))
    mine = nt.export_weights(m)
    theirs = nlattn.export_weights(m)
    assert list(theirs) == list(mine) and all(np.array_equal(theirs[k], mine[k]) for k in mine)


def test_load_weights_is_atomic_and_lists_every_problem():
    m, _ = build("NonLocalBlock2D", dict(in_channels=8))
    before = nt.export_weights(m)
    bad = {k: v + 1 for k, v in before.items()}
    del bad["theta.weight"]                                   # missing
    bad["phi.bias"] = np.zeros(7, np.float32)                 # wrong shape
    bad["W.bias"][0] = np.nan                                 # non-finite
    bad["gamma"] = np.zeros(1, np.float32)                    # unexpected
    bad["g.weight"] = bad["g.weight"].astype(np.int32)        # not floating
    with pytest.raises(WeightError) as info:
        nt.load_weights(m, bad)
    text = str(info.value)
    for needle in ("theta.weight", "phi.bias", "W.bias", "gamma", "g.weight"):
        assert needle in text
    assert len(info.value.problems) == 5
    after = nt.export_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


class _Model(nn.Module):
    """A small network with three nlattn blocks at different depths, and plain layers between."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.layer1 = nn.Sequential(nn.ReLU(), nt.NonLocalBlock2D(8))
        self.attn = nt.SelfAttention(8, qk_ratio=4)
        self.head = nn.ModuleDict({"cam": nt.ChannelAttention(), "fc": nn.Conv2d(8, 2, 1)})

    def forward(self, x):
        x = self.attn(self.layer1(self.stem(x)))
        return self.head["fc"](self.head["cam"](x))


def _randomise(model, seed):
    rng = np.random.default_rng(seed)
    for path, block in nt.blocks(model):
        nt.load_weights(block, random_weights(block.spec.schema(), rng))


def test_model_with_several_blocks_round_trips():
    torch.manual_seed(0)
    a = _Model().eval()
    _randomise(a, 0)
    w = nt.export_weights(a)
    names = {n for n in w}
    assert "layer1.1.theta.weight" in names and "attn.query_conv.weight" in names
    assert "head.cam.gamma" in names and "layer1.1.bn.running_var" in names
    assert not any(n.startswith(("stem.", "head.fc.")) for n in names)     # not nlattn tensors
    expected = {f"{p}.{n}" for p, blk in nt.blocks(a) for n in tensors(blk.spec.schema())}
    assert names == expected
    b = _Model().eval()
    b.stem.load_state_dict(a.stem.state_dict())
    b.head["fc"].load_state_dict(a.head["fc"].state_dict())
    nt.load_weights(b, w)
    again = nt.export_weights(b)
    assert all(w[k].tobytes() == again[k].tobytes() for k in w)
    x = rand((2, 3, 5, 6))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_model_load_is_atomic_across_blocks():
    torch.manual_seed(0)
    m = _Model().eval()
    _randomise(m, 1)
    before = nt.export_weights(m)
    bad = {k: v * 2 for k, v in before.items()}
    bad["attn.key_conv.weight"] = np.zeros((3, 3), np.float32)   # only the second block is wrong
    bad["attn.extra"] = np.zeros(1, np.float32)
    bad["nowhere.weight"] = np.zeros(1, np.float32)
    with pytest.raises(WeightError) as info:
        nt.load_weights(m, bad)
    assert len(info.value.problems) == 3
    assert "attn.key_conv.weight" in str(info.value) and "nowhere.weight" in str(info.value)
    after = nt.export_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)   # layer1.1 untouched too


def test_weights_of_a_module_without_blocks():
    with pytest.raises(TypeError, match="no nlattn block"):
        nt.export_weights(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# input and config errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block, config, x, needle", [
    ("NonLocalBlock2D", dict(in_channels=8), torch.zeros(2, 8, 5), "rank-4"),
    ("NonLocalBlock1D", dict(in_channels=8), torch.zeros(2, 8, 5, 5), "rank-3"),
    ("NonLocalBlock3D", dict(in_channels=4), torch.zeros(2, 4, 5, 5), "rank-5"),
    ("NonLocalBlock2D", dict(in_channels=8), torch.zeros(2, 6, 5, 5), "expected 8 channels, got 6"),
    ("NonLocalBlock2D", dict(in_channels=8), torch.zeros(2, 8, 1, 5), "at least"),
    ("SelfAttention", dict(in_channels=16), torch.zeros(2, 16, 4, 4, dtype=torch.int64), "int64"),
    ("ChannelAttention", dict(in_channels=4), torch.zeros(2, 4, 3, 3, dtype=torch.bool), "bool"),
    ("RelationAwareAttention", dict(in_channels=16, spatial_size=(4, 5), cha_ratio=2, spa_ratio=4,
                                    down_ratio=2), torch.zeros(2, 16, 5, 4), "spatial size (4, 5)"),
    ("NonLocalMeans", dict(patch_size=5), torch.zeros(1, 1, 2, 9), "patch_size // 2"),
    ("CrissCrossAttention", dict(in_channels=8), np.zeros((2, 8, 3, 3), np.float32), "torch.Tensor"),
])
def test_input_errors(block, config, x, needle):
    m = getattr(nt, block)(**config)
    with pytest.raises(InputError, match=block) as info:
        m(x)
    assert needle in str(info.value)


def test_config_errors():
    with pytest.raises(ConfigError, match="implementation"):
        nt.SelfAttention(16, implementation="flash")
    with pytest.raises(ConfigError, match="mode"):
        nt.NonLocalBlock2D(8, mode="softmax")
    with pytest.raises(TypeError):
        nt.Scale(0.0, 1.0)
    assert nt.NonLocalBlock2D(8).implementation == "auto"
    assert "implementation='naive'" in repr(nt.ChannelAttention(implementation="naive"))


def test_every_config_field_is_a_keyword():
    m = nt.NonLocalBlock2D(in_channels=8, inter_channels=2, mode="gaussian", sub_sample=False,
                           bn_layer=True, pool_first=False, scale=0.5, num_heads=2,
                           share_query_key=False, value_channels=4, bn_eps=1e-3, bn_momentum=0.3)
    assert m.spec == make_config("NonLocalBlock2D", in_channels=8, inter_channels=2, mode="gaussian",
                                 sub_sample=False, scale=0.5, num_heads=2, value_channels=4,
                                 bn_eps=1e-3, bn_momentum=0.3)
    assert (m.bn.eps, m.bn.momentum) == (1e-3, 0.3)


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


@pytest.mark.parametrize("block, config", FAST, ids=[f"{b}-{c.get('mode', 'embedded')}-{i}"
                                                     for i, (b, c) in enumerate(FAST)])
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
    assert slow.numel >= n * n            # the check can fail: the naive path does build it
    assert fast.numel < n * n // 8
    assert error(numpy(out), reference(block, x.double().numpy(), w, config)) <= 1e-5


def test_criss_cross_stores_only_row_and_column_energies():
    m, w = build("CrissCrossAttention", dict(in_channels=8, qk_ratio=4))
    x = rand((1, 8, 12, 16))
    with torch.no_grad(), _LargestTensor() as seen:
        out = m(x)
    assert seen.numel <= 12 * 16 * (12 + 16)
    assert error(numpy(out), reference("CrissCrossAttention", x.double().numpy(), w,
                                       dict(in_channels=8, qk_ratio=4))) <= 1e-5


@pytest.mark.parametrize("block, config", [
    ("NonLocalBlock2D", dict(in_channels=8)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="gaussian", num_heads=4, sub_sample=False)),
    ("NonLocalBlock2D", dict(in_channels=8, share_query_key=True, value_channels=6, bn_layer=False)),
    ("SelfAttention", dict(in_channels=16)),
    ("PositionAttention", dict(in_channels=8, qk_ratio=2)),
], ids=["embedded", "gaussian-heads", "sharedqk", "sagan", "pam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_softmax_blocks_run_the_flash_kernel(block, config, dtype):
    """Only the CPU flash kernel is allowed: SDPA raises if its inputs do not qualify for it."""
    m, _ = build(block, config, dtype=dtype)
    x = rand((2, config["in_channels"], 5, 7), dtype=dtype).requires_grad_(True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        m(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("block, config", [
    ("SelfAttention", dict(in_channels=8, qk_ratio=4)),
    ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, mode="gaussian")),
    ("NonLocalBlock2D", dict(in_channels=4, sub_sample=False, mode="concatenation", bn_layer=False)),
], ids=["sagan", "gaussian", "concat"])
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
        slow, attn = m(x, return_attention=True)    # needs the map: the materialising path
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
    assert torch.equal(out.detach(), plain)           # bit for bit the fast_exp value
    out.sum().backward()
    assert torch.all(torch.isfinite(xg.grad)) and xg.grad.abs().sum() > 0
    assert error(numpy(plain), reference("NonLocalMeans", x.numpy(), None,
                                         dict(patch_size=3, patch_distance=2, h=0.3))) <= 1e-12


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
