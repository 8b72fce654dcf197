"""The NumPy reference of non-local means against scikit-image and against an explicit loop."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from nlattn.errors import ConfigError, InputError, WeightError
from nlattn.numpy_ref import run
from nlattn.numpy_ref.nl_means import DISTANCE_CUTOFF, fast_exp, fast_exp_envelope, non_local_means

skimage = pytest.importorskip("skimage")
from skimage import data  # noqa: E402
from skimage.restoration import denoise_nl_means  # noqa: E402

TOL = 1e-6


# ----------------------------------------------------------------------------------------------
# images (H, W, C) in [0, 1] plus fixed-seed Gaussian noise, small crops of scikit-image's own data
# ----------------------------------------------------------------------------------------------


def _camera(h=40, w=48, noise=0.08, seed=0):
    img = data.camera()[200 : 200 + h, 220 : 220 + w] / 255.0
    return img + noise * np.random.default_rng(seed).standard_normal(img.shape)


def _astronaut(h=32, w=36, noise=0.08, seed=1):
    img = data.astronaut()[100 : 100 + h, 180 : 180 + w] / 255.0
    return img + noise * np.random.default_rng(seed).standard_normal(img.shape)


def _ours(img_hwc, **cfg):
    """Run the reference on one (H, W, C) image (channels-last -> channels-first and back)."""
    return non_local_means(img_hwc.transpose(2, 0, 1)[None], **cfg)[0].transpose(1, 2, 0)


# ----------------------------------------------------------------------------------------------
# an explicit, deliberately naive loop over pixels, candidates, patch rows, columns and channels
# ----------------------------------------------------------------------------------------------


def _fast_exp_scalar(y):
    # Schraudolph's trick: high 32 bits of a double = int(2**20/ln2 * y) + 1023*2**20 - 60801
    hi = int(1512775.3951951856938 * y) + 1072632447
    if hi < 0:
        return 0.0
    return struct.unpack("<d", struct.pack("<Q", hi << 32))[0]


def _loop_nlm(img, s, d, h, sigma, *, cutoff=True, exp=_fast_exp_scalar):
    """(H, W, C) -> (H, W, C). ``cutoff`` and ``exp`` switch scikit-image's quirks off."""
    height, width, n_ch = img.shape
    o = s // 2
    pad = np.pad(img, ((o, o), (o, o), (0, 0)), mode="reflect")
    if s == 1:
        kern = [[1.0]]
    else:
        a = (s - 1) / 4
        kern = [[math.exp(-(k * k + l * l) / (2 * a * a)) for l in range(-o, o + 1)] for k in range(-o, o + 1)]
    total = sum(map(sum, kern))
    kern = [[v / (n_ch * total * h * h) for v in row] for row in kern]
    out = np.empty_like(img)
    for r in range(height):
        for c in range(width):
            acc, wsum = np.zeros(n_ch), 0.0
            for i in range(max(0, r - d), min(height, r + d + 1)):
                for j in range(max(0, c - d), min(width, c + d + 1)):
                    dist, dropped = 0.0, False
                    for k in range(s):
                        if cutoff and dist > DISTANCE_CUTOFF:
                            dropped = True
                            break
                        for l in range(s):
                            for ch in range(n_ch):
                                diff = pad[r + k, c + l, ch] - pad[i + k, j + l, ch]
                                dist += kern[k][l] * (diff * diff - 2 * sigma * sigma)
                    weight = 0.0 if dropped else exp(-max(0.0, dist))
                    wsum += weight
                    acc += weight * img[i, j]
            out[r, c] = acc / wsum
    return out


# ----------------------------------------------------------------------------------------------
# against scikit-image
# ----------------------------------------------------------------------------------------------

PARAMS = [  # patch_size, patch_distance, h, sigma
    pytest.param(7, 11, 0.1, 0.0, id="defaults"),
    pytest.param(5, 3, 0.06, 0.08, id="sigma"),
    pytest.param(3, 5, 0.05, 0.0, id="small-h-cutoff"),
    pytest.param(9, 4, 0.15, 0.05, id="big-patch-sigma"),
    pytest.param(3, 2, 0.02, 0.1, id="tiny-h-big-sigma"),
    pytest.param(5, 0, 0.1, 0.0, id="no-search"),
]


@pytest.mark.parametrize("patch_size, patch_distance, h, sigma", PARAMS)
def test_matches_skimage_grayscale(patch_size, patch_distance, h, sigma):
    img = _camera()
    ref = denoise_nl_means(img, patch_size, patch_distance, h, fast_mode=False, sigma=sigma)
    out = _ours(img[..., None], patch_size=patch_size, patch_distance=patch_distance, h=h, sigma=sigma)
    assert np.abs(out[..., 0] - ref).max() <= TOL


@pytest.mark.parametrize("patch_size, patch_distance, h, sigma", PARAMS)
def test_matches_skimage_colour(patch_size, patch_distance, h, sigma):
    img = _astronaut()
    ref = denoise_nl_means(img, patch_size, patch_distance, h, fast_mode=False, sigma=sigma, channel_axis=-1)
    out = _ours(img, patch_size=patch_size, patch_distance=patch_distance, h=h, sigma=sigma)
    assert np.abs(out - ref).max() <= TOL


FAST_PARAMS = [  # patch_size, patch_distance, h, sigma; the pad s//2 + d + 1 exceeds the crop in "wide-search"
    pytest.param(7, 11, 0.1, 0.0, id="defaults"),
    pytest.param(5, 3, 0.06, 0.08, id="sigma"),
    pytest.param(3, 5, 0.05, 0.0, id="small-h-cutoff"),
    pytest.param(9, 4, 0.15, 0.05, id="big-patch-sigma"),
    pytest.param(1, 2, 0.1, 0.0, id="patch-1-empty-box"),
    pytest.param(5, 0, 0.1, 0.0, id="no-search"),
]


@pytest.mark.parametrize("patch_size, patch_distance, h, sigma", FAST_PARAMS)
def test_fast_mode_matches_skimage_grayscale(patch_size, patch_distance, h, sigma):
    img = _camera()
    ref = denoise_nl_means(img, patch_size, patch_distance, h, fast_mode=True, sigma=sigma)
    cfg = dict(patch_size=patch_size, patch_distance=patch_distance, h=h, sigma=sigma, fast_mode=True)
    assert np.abs(_ours(img[..., None], **cfg)[..., 0] - ref).max() <= TOL


@pytest.mark.parametrize("patch_size, patch_distance, h, sigma", FAST_PARAMS[:4])
def test_fast_mode_matches_skimage_colour(patch_size, patch_distance, h, sigma):
    img = _astronaut()
    ref = denoise_nl_means(img, patch_size, patch_distance, h, fast_mode=True, sigma=sigma, channel_axis=-1)
    cfg = dict(patch_size=patch_size, patch_distance=patch_distance, h=h, sigma=sigma, fast_mode=True)
    assert np.abs(_ours(img, **cfg) - ref).max() <= TOL


def test_fast_mode_reflects_beyond_a_small_image():
    # pad 2 + 9 + 1 = 12 > 8 rows: NumPy reflects again, and so must the candidates and patches
    img = _camera(8, 10, seed=4)
    ref = denoise_nl_means(img, 5, 9, 0.08, fast_mode=True)
    assert (
        np.abs(_ours(img[..., None], patch_size=5, patch_distance=9, h=0.08, fast_mode=True)[..., 0] - ref).max() <= TOL
    )


def test_fast_mode_is_another_filter_and_not_the_default():
    img = _camera(16, 18, seed=5)
    slow = _ours(img[..., None], patch_size=5, patch_distance=3, h=0.08)
    fast = _ours(img[..., None], patch_size=5, patch_distance=3, h=0.08, fast_mode=True)
    np.testing.assert_array_equal(slow, _ours(img[..., None], patch_size=5, patch_distance=3, h=0.08, fast_mode=False))
    assert np.abs(slow - fast).max() > 1e-3


@pytest.mark.parametrize("sigma", [0.0, 0.08])
def test_quirks_are_what_skimage_does(sigma):
    """The loop with the cutoff and fast_exp is skimage; dropping either one is visibly not."""
    img = _camera(12, 14, seed=3)
    cfg = dict(s=5, d=3, h=0.06, sigma=sigma)
    ref = denoise_nl_means(img, 5, 3, 0.06, fast_mode=False, sigma=sigma)
    assert np.abs(_loop_nlm(img[..., None], **cfg)[..., 0] - ref).max() <= TOL
    no_cutoff = _loop_nlm(img[..., None], **cfg, cutoff=False)[..., 0]
    true_exp = _loop_nlm(img[..., None], **cfg, exp=math.exp)[..., 0]
    assert np.abs(no_cutoff - ref).max() > 1e-4
    assert np.abs(true_exp - ref).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# against the explicit loop, batches, edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, sigma", [(1, 0.0), (1, 0.1), (2, 0.05)])
def test_matches_explicit_loop(channels, sigma):
    img = np.random.default_rng(7).random((6, 7, channels))
    out = _ours(img, patch_size=3, patch_distance=2, h=0.3, sigma=sigma)
    np.testing.assert_allclose(out, _loop_nlm(img, 3, 2, 0.3, sigma), rtol=0, atol=1e-12)


def test_patch_size_one_is_the_single_tap_limit():
    # scikit-image's kernel is NaN here (A = 0); we use the A -> 0 limit, one tap of 1/(C h^2)
    img = np.random.default_rng(8).random((6, 7, 3))
    out = _ours(img, patch_size=1, patch_distance=2, h=0.4, sigma=0.1)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _loop_nlm(img, 1, 2, 0.4, 0.1), rtol=0, atol=1e-12)


def test_batch_equals_separate_calls():
    rng = np.random.default_rng(9)
    x = rng.random((2, 3, 11, 13))
    cfg = dict(patch_size=5, patch_distance=3, h=0.2, sigma=0.05)
    out = non_local_means(x, **cfg)
    assert out.shape == x.shape and out.dtype == np.float64
    for k in range(2):
        np.testing.assert_array_equal(out[k : k + 1], non_local_means(x[k : k + 1], **cfg))


def test_no_search_window_is_identity_and_float32_input_is_accepted():
    x = np.random.default_rng(10).random((1, 2, 8, 9)).astype(np.float32)
    out = non_local_means(x, patch_size=3, patch_distance=0)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, x.astype(np.float64), rtol=1e-15, atol=0)


_EXP_A_FOR_TEST = 2**20 / math.log(2)


def test_fast_exp():
    assert fast_exp(0.0) == _fast_exp_scalar(0.0)
    assert abs(fast_exp(0.0) - 0.97101) < 1e-5  # not 1: it is an approximation
    y = -np.linspace(0, 700, 100001)
    f = fast_exp(y)
    np.testing.assert_array_equal(f[::997], [_fast_exp_scalar(v) for v in y[::997]])
    assert (np.diff(f) <= 0).all()  # monotone
    assert np.abs(f / np.exp(y) - 1).max() < 0.06  # within a few per cent
    assert (fast_exp([-800.0, -1e4, -np.inf]) == 0).all()  # where the bit trick would wrap


def test_fast_exp_envelope_is_the_continuous_function_fast_exp_samples():
    y = -np.random.default_rng(11).uniform(0, 40, 100000)
    f, e = fast_exp(y), fast_exp_envelope(y)
    # for y < 0 truncation toward zero raises the high word by less than one unit: at most 2**-20 above
    assert (f >= e).all() and (f <= e * (1 + 2.0**-20)).all()
    # the slope inside a binade is 2**(E-1023)/ln 2 (frexp's exponent e is E - 1022), by a secant far
    # wider than fast_exp's 6.6e-7-wide steps but inside one binade
    m, ex = np.frexp(e)
    inside = (m > 0.6) & (m < 0.9)
    step = 1e-3
    secant = (fast_exp_envelope(y + step) - fast_exp_envelope(y - step)) / (2 * step)
    np.testing.assert_allclose(secant[inside], np.ldexp(1.0, ex[inside] - 1) / math.log(2), rtol=1e-9)
    # continuous across binade boundaries (where the mantissa wraps) and monotone
    boundary = -np.log(2) * np.arange(1, 30) + 60801 / _EXP_A_FOR_TEST
    below, above = fast_exp_envelope(boundary - 1e-9), fast_exp_envelope(boundary + 1e-9)
    assert (np.frexp(below)[0] > 0.999).all() and (np.frexp(above)[0] < 0.501).all()  # a boundary
    np.testing.assert_allclose(below, above, rtol=1e-8)
    grid = -np.linspace(0, 50, 200001)
    assert (np.diff(fast_exp_envelope(grid)) < 0).all()
    assert (fast_exp_envelope([-800.0, -np.inf]) == 0).all()


def test_derivatives_are_taken_of_the_envelope():
    x = np.random.default_rng(12).random((1, 1, 6, 6))
    cfg = dict(patch_size=3, patch_distance=2, h=0.3)
    envelope = run("NonLocalMeans", x, {}, cfg, for_derivative=True)
    exact = run("NonLocalMeans", x, {}, cfg)
    np.testing.assert_array_equal(exact, non_local_means(x, **cfg))
    assert 0 < np.abs(envelope - exact).max() < 1e-5  # a different function, barely


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(patch_size=4),
        dict(patch_size=0),
        dict(patch_size=2.0),
        dict(patch_distance=-1),
        dict(h=0.0),
        dict(h=-0.1),
        dict(sigma=-1.0),
        dict(fast_mode="True"),
        dict(fast_mode=1),
        dict(nonsense=1),
    ],
)
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        non_local_means(np.zeros((1, 1, 8, 8)), **bad)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((8, 8)),  # no batch / channel axes
        np.zeros((1, 8, 8)),  # rank 3
        np.zeros((1, 1, 2, 8, 8)),  # rank 5
        np.zeros((1, 1, 8, 8), dtype=np.int64),  # not floating point
        np.zeros((1, 1, 3, 8)),  # 3 <= 7 // 2: cannot reflect-pad
    ],
)
def test_bad_input(x):
    with pytest.raises(InputError):
        non_local_means(x)


def test_no_weights_and_no_attention_map():
    x = np.zeros((1, 1, 8, 8))
    with pytest.raises(WeightError):
        non_local_means(x, {"gamma": np.zeros(1)})
    with pytest.raises(ValueError, match="no attention map"):
        non_local_means(x, return_attention=True)


def test_tiny_h_stays_a_weighted_mean():
    # Only the last patch row differs, so the cutoff never fires and the distance (~0.106/h^2) is
    # far past fast_exp's range: scikit-image's bit trick wraps there (negative or NaN weights);
    # ours gives those candidates weight 0, as exp would.
    img = np.zeros((7, 5, 1))
    img[4:] = 1.0
    out = _ours(img, patch_size=3, patch_distance=1, h=0.005)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(out, _loop_nlm(img, 3, 1, 0.005, 0.0))
