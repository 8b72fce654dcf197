"""Property-based conformance: random configs × random shapes (odd, non-square, tiny) × every
framework × both implementations, each against the float64 reference.

CI runs the "ci" profile (200 examples, derandomized: the same examples every run); a longer
local search: ``python -m pytest tests/test_properties.py --hypothesis-profile thorough``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nlattn
from conftest import FRAMEWORKS, driver
from nlattn import ConfigError, InputError
from nlattn.conformance.runner import TOLERANCE, error
from nlattn.numpy_ref import run as reference
from nlattn.specs import random_weights

settings.register_profile(
    "ci", max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("ci")


@st.composite
def non_local(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    mode = draw(st.sampled_from(nlattn.specs.NONLOCAL_MODES))
    c = draw(st.integers(1, 8))
    config = dict(in_channels=c, mode=mode, sub_sample=draw(st.booleans()), bn_layer=draw(st.booleans()))
    if mode != "gaussian":
        config["inter_channels"] = draw(st.integers(1, 6))
        config["pool_first"] = draw(st.booleans())
        config["share_query_key"] = draw(st.booleans())
        config["value_channels"] = draw(st.none() | st.integers(1, 6))
    if mode != "concatenation":
        config["scale"] = draw(st.none() | st.floats(0.05, 2.0))
        config["num_heads"] = draw(st.sampled_from([1, 2]))
    block = f"NonLocalBlock{dims}D"
    return block, config, draw(_spatial(dims))


@st.composite
def qkv(draw):
    block = draw(st.sampled_from(["SelfAttention", "PositionAttention", "CrissCrossAttention"]))
    ratio = draw(st.sampled_from([1, 2, 4, 8]))
    config = dict(in_channels=draw(st.integers(ratio, 16)), qk_ratio=ratio)
    if block == "CrissCrossAttention":
        config["recurrence"] = draw(st.integers(1, 2))
    return block, config, draw(_spatial(2))


@st.composite
def others(draw):
    block = draw(st.sampled_from(["ChannelAttention", "RelationAwareAttention", "NonLocalMeans", "Scale"]))
    spatial = draw(_spatial(2))
    if block == "ChannelAttention":
        return block, dict(in_channels=draw(st.none() | st.integers(1, 8))), spatial
    if block == "RelationAwareAttention":
        config = dict(in_channels=draw(st.integers(4, 16)), spatial_size=spatial, cha_ratio=draw(st.integers(1, 4)),
                      spa_ratio=draw(st.integers(1, 4)), down_ratio=draw(st.integers(1, 4)),
                      use_spatial=draw(st.booleans()), use_channel=draw(st.booleans()))  # fmt: skip
        return block, config, spatial
    if block == "NonLocalMeans":
        config = dict(patch_size=draw(st.sampled_from([1, 3, 5])), patch_distance=draw(st.integers(0, 3)),
                      h=draw(st.floats(0.05, 1.0)), sigma=draw(st.floats(0.0, 0.2)))  # fmt: skip
        return block, config, spatial
    return block, dict(init=draw(st.floats(-2.0, 2.0))), spatial


@st.composite
def context(draw):
    """GlobalContext and the disentangled non-local blocks: one context per image / a whitened relation."""
    block = draw(st.sampled_from(["GlobalContext", *(f"DisentangledNonLocal{d}D" for d in (1, 2, 3))]))
    c = draw(st.integers(1, 8))
    if block == "GlobalContext":
        rounding = draw(st.sampled_from(nlattn.specs.GC_ROUNDINGS))
        config = dict(in_channels=c, ratio=draw(st.sampled_from([0.25, 0.5, 1.0])),
                      inter_channels=draw(st.none() | st.integers(1, 6)),
                      pooling_type=draw(st.sampled_from(nlattn.specs.GC_POOLINGS)),
                      channel_add=draw(st.booleans()), channel_mul=draw(st.booleans()), rounding=rounding,
                      divisor=draw(st.integers(1, 4)) if rounding == "timm" else 1)  # fmt: skip
        return block, config, draw(_spatial(2))
    config = dict(in_channels=c, inter_channels=draw(st.none() | st.integers(1, 6)),
                  temperature=draw(st.sampled_from([0.05, 0.2, 1.0])), use_scale=draw(st.booleans()),
                  bn_layer=draw(st.booleans()))  # fmt: skip
    return block, config, draw(_spatial(int(block[-2])))


def _spatial(dims):
    return st.tuples(*[st.integers(1, 7)] * dims)


@given(
    framework=st.sampled_from(FRAMEWORKS),
    implementation=st.sampled_from(["auto", "naive"]),
    drawn=st.one_of(non_local(), qkv(), others(), context()),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_every_framework_equals_the_reference(framework, implementation, drawn, batch, seed):
    block, config, spatial = drawn
    try:
        spec = nlattn.make_config(block, **config)
        channels = spec.expected_channels() or 3
        shape = (batch, channels, *spatial)
        spec.check_input_shape(shape)
    except (ConfigError, InputError):
        assume(False)  # an invalid draw (the generators stay simple: the spec decides), not counted
    rng = np.random.default_rng(seed)
    weights = {k: v.astype(np.float32) for k, v in random_weights(spec.schema(), rng).items()}
    x = rng.uniform(0, 1, shape) if block == "NonLocalMeans" else rng.normal(size=shape)
    x = x.astype(np.float32)
    want = reference(block, x.astype(np.float64), weights, spec.to_dict())
    fw = driver(framework)
    m = fw.loaded(block, spec.to_dict(), weights, implementation=implementation)
    got = fw.run(m, x)
    assert error(got, want) <= TOLERANCE["float32"], f"{framework} {implementation} {spec} {shape}"
