"""Canonical weight files, safe checkpoint readers and ``nlattn convert`` (NumPy, plus torch for .pt).

Round trips are checked bit for bit; every failure mode (missing, extra, mis-shaped, integer, NaN,
truncated, corrupt, foreign, malicious) must give a clear error and change nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import nlattn
from nlattn import Checkpoint, ConfigError, WeightError, from_checkpoint, load_file, make_config, save_weights
from nlattn.cli import main
from nlattn.numpy_ref import run
from nlattn.specs import random_weights, tensors
from nlattn.weights import LAYOUT_VERSION, UnsafePickleError, WeightFileError, read_state_dict
from nlattn.weights.frameworks import backend, build, framework_of, load_weights

CASES = {  # one config per family; RGA has a tuple keyword, timm-like configs a float scale
    "NonLocalBlock3D": dict(in_channels=4, mode="dot_product", pool_first=True),
    "NonLocalBlock2D": dict(in_channels=6, inter_channels=2, scale=6**-0.5, bn_eps=1.0000001e-5),
    "RelationAwareAttention": dict(in_channels=8, spatial_size=(2, 4), cha_ratio=2, spa_ratio=2, down_ratio=2),
    "ExplicitVisualCenter": dict(in_channels=4, num_codes=3, mlp_ratio=2),
    "CrissCrossAttention": dict(in_channels=8, recurrence=2),
    "Scale": dict(init=0.5),
}


def f32(spec, seed=0):
    return {k: v.astype(np.float32) for k, v in random_weights(spec.schema(), np.random.default_rng(seed)).items()}


def nl2d():
    spec = make_config("NonLocalBlock2D", in_channels=4)
    return spec, f32(spec)


def listing(directory):
    return sorted(os.listdir(directory))


# ----------------------------------------------------------------------------------------------
# save_weights / load_file
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", list(CASES))
def test_round_trip_is_bit_exact_with_metadata(tmp_path, block):
    spec = make_config(block, **CASES[block])
    w = f32(spec, seed=len(block))
    path = tmp_path / "w.safetensors"
    assert save_weights(path, w, config=CASES[block], block=block) == str(path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert set(meta) == {"nlattn_block", "nlattn_config", "nlattn_layout", "nlattn_version"}
    assert (meta["nlattn_block"], meta["nlattn_layout"], meta["nlattn_version"]) == (
        block,
        LAYOUT_VERSION,
        nlattn.__version__,
    )
    assert json.loads(meta["nlattn_config"]) == spec.to_dict()

    ckpt = load_file(path)
    assert ckpt.block == block and ckpt.config == spec.to_dict()
    assert make_config(block, **ckpt.config) == spec  # tuples and floats survive JSON
    assert list(ckpt.weights) == list(tensors(spec.schema()))  # schema order
    for name, value in w.items():
        assert ckpt.weights[name].dtype == np.float32
        assert np.array_equal(ckpt.weights[name], value)
    again = tmp_path / "again.safetensors"
    save_weights(again, ckpt)  # load -> save -> load
    twice = load_file(again)
    assert twice.config == ckpt.config
    assert all(np.array_equal(twice.weights[k], v) and twice.weights[k].dtype == v.dtype for k, v in w.items())


def test_float64_weights_stay_float64(tmp_path):
    spec = make_config("SelfAttention", in_channels=8)
    w = random_weights(spec.schema(), np.random.default_rng(1))
    save_weights(tmp_path / "w.safetensors", Checkpoint("SelfAttention", {"in_channels": 8}, w))
    back = load_file(tmp_path / "w.safetensors").weights
    assert all(back[k].dtype == np.float64 and np.array_equal(back[k], w[k]) for k in w)


def test_imported_checkpoint_saves_its_conventions(tmp_path):
    rng = np.random.default_rng(2)
    sd = {
        f"{m}.{p}": rng.normal(size=(3, 8, 1, 1) if p == "weight" else (3,)).astype(np.float32)
        for m in "tpg"
        for p in ("weight", "bias")
    }
    sd["z.weight"], sd["z.bias"] = rng.normal(size=(8, 3, 1, 1)).astype(np.float32), np.zeros(8, np.float32)
    sd.update(
        {
            f"norm.{k}": np.full(8, v, np.float32)
            for k, v in (("weight", 1.5), ("bias", 0.1), ("running_mean", 0.2), ("running_var", 0.9))
        }
    )
    ckpt = from_checkpoint(sd, "timm")
    save_weights(tmp_path / "timm.safetensors", ckpt)
    back = load_file(tmp_path / "timm.safetensors")
    assert back.config["scale"] == 8**-0.5 and back.config["sub_sample"] is False
    x = rng.normal(size=(1, 8, 3, 3))
    assert np.array_equal(run(back.block, x, back.weights, back.config), run(ckpt.block, x, ckpt.weights, ckpt.config))


def test_saved_files_honour_the_umask_and_keep_an_existing_mode(tmp_path):
    spec = make_config("Scale")
    old = os.umask(0o027)
    try:
        path = save_weights(tmp_path / "new.safetensors", f32(spec), block="Scale", config={})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640  # as open() would create it
    os.chmod(path, 0o644)
    save_weights(path, f32(spec, 1), block="Scale", config={})
    assert os.stat(path).st_mode & 0o777 == 0o644  # rewriting keeps the file's mode
    assert np.array_equal(load_file(path).weights["gamma"], f32(spec, 1)["gamma"])


def test_two_threads_saving_to_one_path_both_succeed(tmp_path):
    import threading

    spec = make_config("NonLocalBlock2D", in_channels=4)
    sets = [f32(spec, 0), f32(spec, 1)]
    path, errors = tmp_path / "nl.safetensors", []
    for _ in range(10):
        barrier = threading.Barrier(2)

        def save(w, barrier=barrier):
            barrier.wait()
            try:
                save_weights(path, w, block="NonLocalBlock2D", config={"in_channels": 4})
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                errors.append(e)

        threads = [threading.Thread(target=save, args=(w,)) for w in sets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = load_file(path).weights
        assert any(all(np.array_equal(got[k], w[k]) for k in w) for w in sets)
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nl.safetensors"]  # no temporary left


def test_save_weights_validates_before_writing(tmp_path):
    spec, w = nl2d()
    cfg = spec.to_dict()
    path = tmp_path / "w.safetensors"
    save_weights(path, w, config=cfg, block="NonLocalBlock2D")
    before = path.read_bytes()
    bad = dict(w)
    del bad["theta.bias"]  # missing
    bad["extra.weight"] = np.ones(2, np.float32)  # extra
    bad["phi.weight"] = np.ones((2, 4, 1, 2), np.float32)  # mis-shaped
    bad["g.bias"] = np.arange(2)  # integer
    bad["bn.running_var"] = np.array([1, np.inf, 1, 1], np.float32)  # non-finite
    with pytest.raises(WeightError) as e:
        save_weights(path, bad, config=cfg, block="NonLocalBlock2D")
    msg = str(e.value)
    assert "5 problem(s)" in msg
    for part in (
        "missing 'theta.bias'",
        "unexpected 'extra.weight'",
        "'phi.weight' has shape (2, 4, 1, 2)",
        "'g.bias' has dtype int64",
        "'bn.running_var' has non-finite values",
    ):
        assert part in msg
    with pytest.raises(ConfigError, match="needs block="):
        save_weights(path, w, config=cfg)
    with pytest.raises(ConfigError, match="in_channels must be an integer >= 1"):
        save_weights(path, w, config={**cfg, "in_channels": 0}, block="NonLocalBlock2D")
    with pytest.raises(ConfigError, match="unknown block 'NonLocal'"):
        save_weights(path, w, config=cfg, block="NonLocal")
    with pytest.raises(TypeError, match="expected an nlattn block"):
        save_weights(path, [1, 2, 3])
    assert path.read_bytes() == before and listing(tmp_path) == ["w.safetensors"]


def write_with_metadata(path, weights, **meta):
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path), metadata=meta or None)
    return path


def good_meta(spec):
    return {
        "nlattn_block": spec.block,
        "nlattn_config": json.dumps(spec.to_dict()),
        "nlattn_layout": LAYOUT_VERSION,
        "nlattn_version": nlattn.__version__,
    }


def test_load_file_failure_modes(tmp_path):
    spec, w = nl2d()
    good = tmp_path / "good.safetensors"
    save_weights(good, w, config=spec.to_dict(), block=spec.block)
    data = good.read_bytes()

    def fails(path, match, error=WeightFileError):
        with pytest.raises(error, match=match) as e:
            load_file(path)
        assert isinstance(e.value, ValueError)  # WeightError: a ValueError, never a raw traceback
        if error is WeightFileError:
            assert str(e.value).startswith(str(path))
        return e.value

    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 20])
    fails(tmp_path / "cut.safetensors", "truncated or corrupt")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    fails(tmp_path / "tiny.safetensors", "truncated or corrupt")
    (tmp_path / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
    fails(tmp_path / "junk.safetensors", "not a readable safetensors file")
    header = b'{"a": not json}'
    (tmp_path / "header.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    fails(tmp_path / "header.safetensors", "not a readable safetensors file")
    fails(write_with_metadata(tmp_path / "foreign.safetensors", w), "not an nlattn weights file")
    fails(write_with_metadata(tmp_path / "hf.safetensors", w, format="pt"), "not an nlattn weights file")
    fails(
        write_with_metadata(tmp_path / "v2.safetensors", w, **{**good_meta(spec), "nlattn_layout": "2"}),
        "canonical layout version '2', this nlattn reads '1'",
    )
    fails(
        write_with_metadata(tmp_path / "json.safetensors", w, **{**good_meta(spec), "nlattn_config": "{oops"}),
        "nlattn_config is not a JSON object",
    )
    fails(
        write_with_metadata(tmp_path / "list.safetensors", w, **{**good_meta(spec), "nlattn_config": "[4]"}),
        "nlattn_config is not a JSON object",
    )
    bad_cfg = {**good_meta(spec), "nlattn_config": json.dumps({**spec.to_dict(), "mode": "cosine"})}
    fails(write_with_metadata(tmp_path / "cfg.safetensors", w, **bad_cfg), "invalid config: .*mode must be one of")
    fails(
        write_with_metadata(tmp_path / "blk.safetensors", w, **{**good_meta(spec), "nlattn_block": "Attn"}),
        "invalid config: unknown block 'Attn'",
    )
    nan = {**w, "W.bias": np.array([0, np.nan, 0, 0], np.float32)}
    e = fails(
        write_with_metadata(tmp_path / "nan.safetensors", nan, **good_meta(spec)),
        "'W.bias' has non-finite values",
        WeightError,
    )
    assert "nan.safetensors" in str(e)
    short = {k: v for k, v in w.items() if k != "bn.weight"}
    fails(
        write_with_metadata(tmp_path / "short.safetensors", short, **good_meta(spec)),
        "missing 'bn.weight'",
        WeightError,
    )
    ints = {**w, "bn.bias": np.arange(4, dtype=np.int32)}
    fails(
        write_with_metadata(tmp_path / "int.safetensors", ints, **good_meta(spec)),
        "'bn.bias' has dtype int32",
        WeightError,
    )
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_file(tmp_path / "absent.safetensors")
    fails(tmp_path, "is a directory")
    assert good.read_bytes() == data and load_file(good).block == "NonLocalBlock2D"


# ----------------------------------------------------------------------------------------------
# safe readers: .pkl (allow-listed unpickler), .pt (weights_only), .npz (allow_pickle=False)
# ----------------------------------------------------------------------------------------------


class Evil:
    """Unpickling calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvilExec:
    def __reduce__(self):
        return exec, ("open('MARKER', 'w').close()",)


def test_pickle_of_arrays_loads(tmp_path):
    import collections

    blobs = collections.OrderedDict(
        a_w=np.arange(6, dtype=np.float32).reshape(2, 3), lr=np.float32(0.1), model_iter=7, name="x"
    )
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=protocol))
        state = read_state_dict(path)
        assert list(state) == ["a_w", "lr", "model_iter", "name"]
        assert state["a_w"].dtype == np.float32 and np.array_equal(state["a_w"], blobs["a_w"])


@pytest.mark.parametrize("payload", ["system", "exec", "nested"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "MARKER"
    evil = {
        "system": Evil(marker),
        "exec": EvilExec(),
        "nested": {"blobs": {"nonlocal_conv3_1_theta_w": np.zeros((2, 4, 1, 1, 1), np.float32), "lr": Evil(marker)}},
    }[payload]
    path = tmp_path / "c2_model.pkl"
    path.write_bytes(pickle.dumps(evil, protocol=2))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # EvilExec writes ./MARKER
    try:
        refused = r"refused to unpickle global (posix|os|nt|builtins|__builtin__)\.(system|exec)"
        with pytest.raises(UnsafePickleError, match=refused):
            read_state_dict(path)
        with pytest.raises(UnsafePickleError, match="c2_model.pkl"):
            from_checkpoint(str(path), "caffe2")
    finally:
        os.chdir(cwd)
    assert not marker.exists()
    assert isinstance(UnsafePickleError("p", "m"), WeightError)


def test_allowed_globals_cannot_be_abused(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")  # _codecs.encode('abc', 'rot13')
    with pytest.raises(WeightFileError, match="only allowed on text with latin1"):
        read_state_dict(path)
    path.write_bytes(b"cnumpy\nload\n(V/etc/passwd\ntR.")  # numpy, but not an allowed name
    with pytest.raises(UnsafePickleError, match="refused to unpickle global numpy.load"):
        read_state_dict(path)


def test_malicious_torch_and_npz_files_are_refused(tmp_path):
    marker = tmp_path / "MARKER"
    pt = tmp_path / "evil.pth"
    torch.save({"state_dict": {"g.weight": torch.zeros(2, 4, 1, 1), "hook": Evil(marker)}}, pt)
    with pytest.raises(WeightFileError, match="weights_only=True"):
        read_state_dict(pt)
    npz = tmp_path / "evil.npz"
    np.savez(npz, w=np.zeros(3, np.float32), obj=np.array([Evil(marker)], dtype=object))
    with pytest.raises(WeightFileError, match="not a readable .npz file"):
        read_state_dict(npz)
    assert not marker.exists()


def test_truncated_corrupt_and_unknown_files(tmp_path):
    state = {"a.weight": np.ones((2, 2), np.float32)}
    pkl = tmp_path / "s.pkl"
    pkl.write_bytes(pickle.dumps(state, protocol=2)[:-10])
    npz = tmp_path / "s.npz"
    np.savez(npz, **state)
    npz.write_bytes(npz.read_bytes()[:40])
    pt = tmp_path / "s.pt"
    pt.write_bytes(b"PK\x03\x04 not really a zip")
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([np.ones(2)], protocol=2))
    for path, match in (
        (pkl, "not a readable pickle"),
        (npz, "not a readable .npz"),
        (pt, "cannot read the PyTorch checkpoint"),
        (listed, "expected a dict of tensors"),
    ):
        with pytest.raises(WeightFileError, match=match) as e:
            read_state_dict(path)
        assert str(path) in str(e.value)
    other = tmp_path / "w.h5"
    other.write_bytes(b"\x89HDF")
    with pytest.raises(WeightFileError, match="unknown checkpoint format"):
        read_state_dict(other)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nothing.pt")


def test_timm_safetensors_checkpoint(tmp_path):
    """timm's hub checkpoints are .safetensors files of a whole model."""
    rng = np.random.default_rng(4)
    p = "stages.1.0.attn."
    sd = {"stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32)}
    for m, (o, i) in {"t": (2, 8), "p": (2, 8), "g": (2, 8), "z": (8, 2)}.items():
        sd[f"{p}{m}.weight"] = rng.normal(size=(o, i, 1, 1)).astype(np.float32)
        sd[f"{p}{m}.bias"] = rng.normal(size=o).astype(np.float32)
    for k in ("weight", "bias", "running_mean"):
        sd[f"{p}norm.{k}"] = rng.normal(size=8).astype(np.float32)
    sd[f"{p}norm.running_var"] = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ckpt = from_checkpoint(str(tmp_path / "model.safetensors"), "timm")
    assert (ckpt.block, ckpt.config["in_channels"], ckpt.config["inter_channels"]) == ("NonLocalBlock2D", 8, 2)
    assert np.array_equal(ckpt.weights["W.weight"], sd[p + "z.weight"])
    assert np.array_equal(ckpt.weights["bn.running_var"], sd[p + "norm.running_var"])


# ----------------------------------------------------------------------------------------------
# nlattn convert
# ----------------------------------------------------------------------------------------------

ALEXHEX7 = {
    "g.weight": "g.0.weight",
    "g.bias": "g.0.bias",
    "phi.weight": "phi.0.weight",
    "phi.bias": "phi.0.bias",
    "W.weight": "W.0.weight",
    "W.bias": "W.0.bias",
    "bn.weight": "W.1.weight",
    "bn.bias": "W.1.bias",
    "bn.running_mean": "W.1.running_mean",
    "bn.running_var": "W.1.running_var",
}


def alexhex7_file(tmp_path, w, prefix="module.nl."):
    """An AlexHex7 NONLocalBlock2D (sub_sample, bn_layer) inside a DataParallel model, as .pth."""
    sd = {prefix + ALEXHEX7.get(k, k): torch.from_numpy(v) for k, v in w.items()}
    sd[prefix + "W.1.num_batches_tracked"] = torch.tensor(3)
    sd["module.fc.weight"] = torch.ones(3, 4)
    path = tmp_path / "alexhex7.pth"
    torch.save({"state_dict": sd, "epoch": 9}, path)
    return path


def test_convert_published_to_safetensors(tmp_path, capsys):
    spec, w = nl2d()
    src = alexhex7_file(tmp_path, w)
    dst = tmp_path / "nl.safetensors"
    assert main(["convert", str(src), str(dst), "--source", "alexhex7"]) == 0
    out = capsys.readouterr().out
    assert "module.nl.W.1.weight -> bn.weight (4,) float32" in out
    assert "dropped module.nl.W.1.num_batches_tracked" in out
    assert f"wrote 12 tensors to {dst} (canonical safetensors)" in out
    ckpt = load_file(dst)
    assert ckpt.block == "NonLocalBlock2D" and ckpt.config == {**spec.to_dict(), "inter_channels": 2}
    assert all(np.array_equal(ckpt.weights[k], w[k]) for k in w)
    x = np.random.default_rng(5).normal(size=(2, 4, 4, 6))
    assert np.array_equal(run(ckpt.block, x, ckpt.weights, ckpt.config), run(spec.block, x, w, spec.to_dict()))


def test_convert_reports_dropped_and_applies_config(tmp_path, capsys):
    spec = make_config("ExplicitVisualCenter", in_channels=4, num_codes=2)
    w = f32(spec, seed=3)
    sd = {f"neck.evc.{k}": v for k, v in w.items()}
    sd["neck.evc.l_MLP.linear.weight"] = np.ones((4, 4), np.float32)
    sd["neck.evc.l_MLP.linear.bias"] = np.ones(4, np.float32)
    np.savez(tmp_path / "cfp.npz", **sd)
    dst = tmp_path / "evc.safetensors"
    assert main(["convert", str(tmp_path / "cfp.npz"), str(dst), "--source", "cfpnet", "--config", "bn_eps=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "dropped neck.evc.l_MLP.linear.weight: LightMLPBlock.linear is defined but never used" in out
    assert load_file(dst).config["bn_eps"] == 1e-3


def test_convert_canonical_to_torch_state_dict(tmp_path, capsys):
    spec, w = nl2d()
    src = tmp_path / "nl.safetensors"
    save_weights(src, w, config=spec.to_dict(), block=spec.block)
    dst = tmp_path / "nl.pt"
    assert main(["convert", str(src), str(dst)]) == 0
    state = torch.load(dst, map_location="cpu", weights_only=True)
    assert list(state) == list(tensors(spec.schema()))
    for k, v in w.items():
        assert state[k].dtype == torch.float32 and np.array_equal(state[k].numpy(), v)
    # and back: a canonical state dict without metadata, with --block and --config
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(dst), str(back), "--block", "NonLocalBlock2D", "--config", "in_channels=4"]) == 0
    assert all(np.array_equal(load_file(back).weights[k], v) for k, v in w.items())


def test_convert_errors(tmp_path, capsys):
    spec, w = nl2d()
    src = alexhex7_file(tmp_path, w)
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(tmp_path / "out.txt"), "--source", "alexhex7"]) == 2
    assert "unsupported destination" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "out.onnx"), "--source", "alexhex7"]) == 2
    assert "an .onnx destination needs --input-shape" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--source", "alexhex7", "--config", "in_channels"]) == 2
    assert "--config expects key=value" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--source", "alexhex7", "--config", "in_channels=8"]) == 1
    assert "in_channels=8 contradicts the checkpoint" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--source", "alexhex7", "--prefix", "module.other"]) == 1
    assert "no AlexHex7 non-local block at prefix 'module.other'" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--source", "detectron2"]) == 1
    assert "unknown checkpoint source 'detectron2'" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst)]) == 1  # a .pth is not a canonical file
    assert (
        "not an nlattn .safetensors file: for a published checkpoint give its source (--source"
        in capsys.readouterr().err
    )
    assert main(["convert", str(src), str(dst), "--block", "NonLocalBlock2D", "--config", "in_channels=4"]) == 1
    assert "unexpected 'module.nl.g.0.weight'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "none.pth"), str(dst), "--source", "alexhex7"]) == 1
    assert "no such weights file" in capsys.readouterr().err
    assert not dst.exists() and not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.txt").exists()
    assert listing(tmp_path) == ["alexhex7.pth"]


def test_convert_to_an_unwritable_destination_is_one_line(tmp_path, capsys):
    spec, w = nl2d()
    src = alexhex7_file(tmp_path, w)
    missing = tmp_path / "no" / "such" / "out.safetensors"
    assert main(["convert", str(src), str(missing), "--source", "alexhex7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert: cannot write") and "no directory" in err and err.count("\n") == 1
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores directory permissions: a file stands in
            locked.chmod(0o700)
            (locked / "out.safetensors").mkdir()  # os.replace onto a directory fails
        code = main(["convert", str(src), str(locked / "out.safetensors"), "--source", "alexhex7"])
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert code in (1, 2) and err.startswith("convert: cannot write") and err.count("\n") == 1


def test_conformance_with_a_bad_adapter_is_one_line(capsys):
    assert main(["conformance", "--adapter", "garbage"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conformance: cannot load adapter 'garbage'") and err.count("\n") == 1
    assert main(["conformance", "--adapter", "no_such_module:Adapter"]) == 2
    assert "ModuleNotFoundError" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the lazy public API and the framework dispatch without frameworks
# ----------------------------------------------------------------------------------------------


def test_import_nlattn_stays_light():
    code = (
        "import sys, nlattn\n"
        "api = [nlattn.Checkpoint, nlattn.save_weights, nlattn.load_file, nlattn.from_checkpoint,\n"
        "       nlattn.export_weights, nlattn.load_weights, nlattn.build]\n"
        "heavy = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'flax') if m in sys.modules]\n"
        "print(heavy, nlattn.Checkpoint.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "nlattn.weights.files"]
    with pytest.raises(AttributeError, match="no attribute 'load_checkpoint'"):
        getattr(nlattn, "load_checkpoint")  # noqa: B009 - the attribute access is what is tested


def test_dispatch_errors_without_a_framework(monkeypatch):
    with pytest.raises(TypeError, match="cannot tell the framework of a builtins.object"):
        framework_of(object())
    with pytest.raises(ValueError, match="unknown framework 'mxnet'"):
        backend("mxnet")
    monkeypatch.setitem(sys.modules, "nlattn.jax", None)  # as if Flax were not installed
    with pytest.raises(ImportError, match=r"pip install nlattn\[jax\]"):
        backend("flax")
    with pytest.raises(ImportError, match=r"pip install nlattn\[jax\]"):
        build("Scale", "jax")
    with pytest.raises(ConfigError, match="unknown block 'NonLocal'"):
        build("NonLocal", "jax")
    with pytest.raises(ConfigError, match="in_channels must be an integer"):
        build("NonLocalBlock2D", "jax", in_channels=0)  # the config is checked before any import
    with pytest.raises(TypeError, match="expected a dict of arrays, a Checkpoint or a path"):
        load_weights(torch.nn.Linear(1, 1), 3)
