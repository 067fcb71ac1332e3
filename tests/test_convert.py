"""The checkpoint converter: metadata, atomic output, and a named error per bad-input class."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxguide.model.convert import (
    ExpertMismatchError,
    LegacyCheckpointError,
    MissingMemberError,
    NotAZipError,
    OutputExistsError,
    StateDictMismatchError,
    TruncatedCheckpointError,
    UnknownArchitectureError,
    convert_checkpoints,
)
from jaxguide.model.convert.checkpoint import CheckpointError
from jaxguide.model.checkpoint import ModelLoadError, load_model, sha256_file


def _rewrite(src: Path, dst: Path, *, drop=(), replace=None):
    """Copy a checkpoint zip, dropping or replacing members."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            zout.writestr(name, replace.get(name, zin.read(name)))
    return dst


def _model_json(src: Path, **changes) -> bytes:
    with zipfile.ZipFile(src) as z:
        d = json.loads(z.read("model.json"))
    d.update(changes)
    return json.dumps(d).encode()


def _state_dict_bytes(src: Path, edit) -> bytes:
    import torch

    with zipfile.ZipFile(src) as z:
        state = torch.load(io.BytesIO(z.read("net_state.pth")), weights_only=True)
    edit(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return fixtures_dir / "tiny.checkpoint"


def test_metadata(tiny_model_dir, tiny):
    meta = json.loads((tiny_model_dir / "jaxguide.json").read_text())
    assert meta["sources"] == [{"file": "tiny.checkpoint", "sha256": sha256_file(tiny)}]
    assert meta["model_config"]["model_channels"] == 8
    assert meta["batch_info"]["channels"] == ["T850", "T500", "T300", "tas", "pres_msl", "rlut"]
    assert meta["batch_info"]["center"][0] == pytest.approx(281.1327209472656)
    assert meta["sigma_thresholds"] == [] and meta["n_experts"] == 1
    assert "jaxguide_version" in meta


def test_not_a_zip(tmp_path):
    bad = tmp_path / "bad.checkpoint"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(NotAZipError, match="not a zip"):
        convert_checkpoints([bad], tmp_path / "out")


def test_truncated(tmp_path, tiny):
    data = tiny.read_bytes()
    bad = tmp_path / "truncated.checkpoint"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedCheckpointError, match="truncated"):
        convert_checkpoints([bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("member", ["net_state.pth", "model.json", "batch_info.json"])
def test_missing_member(tmp_path, tiny, member):
    bad = _rewrite(tiny, tmp_path / "m.checkpoint", drop=[member])
    with pytest.raises(MissingMemberError, match=member):
        convert_checkpoints([bad], tmp_path / "out")


def test_legacy_pickle_refused(tmp_path, tiny):
    bad = _rewrite(tiny, tmp_path / "old.checkpoint", drop=["metadata.json", "model.json", "batch_info.json"])
    with pytest.raises(LegacyCheckpointError, match="arbitrary code"):
        convert_checkpoints([bad], tmp_path / "out")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"architecture": "unet_hpx1024_patch"}, "unet_hpx1024_patch"),
        ({"time_length": 12}, "time_length=12"),
        ({"architecture": "mystery"}, "mystery"),
    ],
)
def test_unknown_architecture(tmp_path, tiny, changes, match):
    bad = _rewrite(tiny, tmp_path / "a.checkpoint", replace={"model.json": _model_json(tiny, **changes)})
    with pytest.raises(UnknownArchitectureError, match=match):
        convert_checkpoints([bad], tmp_path / "out")


def test_shape_mismatch_reports_everything(tmp_path, tiny):
    bad = _rewrite(tiny, tmp_path / "s.checkpoint", replace={"model.json": _model_json(tiny, model_channels=16)})
    with pytest.raises(StateDictMismatchError) as e:
        convert_checkpoints([bad], tmp_path / "out")
    msg = str(e.value)
    assert "model.pos_embed: shape (8, 1, 49152)" in msg
    assert msg.count("\n") > 100  # every mismatching tensor is listed, not just the first


def test_missing_and_unexpected_keys(tmp_path, tiny):
    def edit(state):
        state.pop("model.map_layer0.bias")
        state["model.extra.weight"] = state["model.map_layer1.bias"].clone()

    bad = _rewrite(tiny, tmp_path / "k.checkpoint", replace={"net_state.pth": _state_dict_bytes(tiny, edit)})
    with pytest.raises(StateDictMismatchError) as e:
        convert_checkpoints([bad], tmp_path / "out")
    assert "missing key: model.map_layer0.bias" in str(e.value)
    assert "unexpected key: model.extra.weight" in str(e.value)


def test_changed_tensor_shape(tmp_path, tiny):
    import torch

    def edit(state):
        state["model.map_layer1.weight"] = torch.zeros(32, 31)

    bad = _rewrite(tiny, tmp_path / "t.checkpoint", replace={"net_state.pth": _state_dict_bytes(tiny, edit)})
    with pytest.raises(StateDictMismatchError, match=r"model.map_layer1.weight: shape \(32, 31\)"):
        convert_checkpoints([bad], tmp_path / "out")


def test_experts_must_agree(tmp_path, tiny):
    other = _rewrite(
        tiny, tmp_path / "e.checkpoint", replace={"model.json": _model_json(tiny, calendar_include_legacy_bug=False)}
    )
    with pytest.raises(ExpertMismatchError, match="calendar_include_legacy_bug"):
        convert_checkpoints([tiny, other], tmp_path / "out", sigma_thresholds=[10.0])


def test_thresholds_must_fit_experts(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="thresholds"):
        convert_checkpoints([tiny, tiny], tmp_path / "out", sigma_thresholds=[])
    with pytest.raises(CheckpointError, match="decreasing"):
        convert_checkpoints([tiny, tiny, tiny], tmp_path / "out", sigma_thresholds=[10.0, 100.0])


def test_output_exists(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        convert_checkpoints([tiny], out)
    convert_checkpoints([tiny], out, overwrite=True)
    assert load_model(out).config.model_channels == 8


def test_interrupted_write_leaves_nothing(tmp_path, tiny, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(self, *a, **k):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoints([tiny], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="jaxguide.json"):
        load_model(tmp_path / "empty")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    meta = json.loads((broken / "jaxguide.json").read_text())
    meta["model_config"]["model_channels"] = 16
    (broken / "jaxguide.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(broken)


def test_round_trip_writer(tmp_path, tiny_model):
    """write_cbottle_checkpoint (used for full-size checkpoints) inverts the converter exactly."""
    from jaxguide.model.convert import read_checkpoint, write_cbottle_checkpoint

    path = write_cbottle_checkpoint(
        tmp_path / "rt.checkpoint", tiny_model.config, tiny_model.batch_info, tiny_model.params[0]
    )
    back = read_checkpoint(path)
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(tiny_model.params[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_importing_jaxguide_does_not_import_torch():
    """The converter lives in jaxguide.model.convert (optional extra); the library and CLI import torch only on `convert`."""
    import subprocess
    import sys

    code = (
        "import sys, jaxguide, jaxguide.cli, jaxguide.assimilation.pipeline, jaxguide.model.checkpoint, jaxguide.model.unet; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'jaxguide.model.convert' not in sys.modules; "
        "import jaxguide.model.convert; assert 'torch' not in sys.modules, 'jaxguide.model.convert imports torch eagerly'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]


def test_checkpoint_with_noise_dependent_dropout_config(tmp_path, tiny):
    """A model.json that sets the (training-only) dropout dict converts, loads and keeps the dict (issue 11 item 5)."""
    from jaxguide.model.config import ModelConfig
    from jaxguide.model.checkpoint import graphdef_and_shapes

    dropout = {"sigma_breaks": [0.1, 10.0], "p": {"low": 0.0, "high": 0.2}}
    ck = _rewrite(tiny, tmp_path / "d.checkpoint", replace={"model.json": _model_json(tiny, noise_dependent_dropout_config=dropout)})
    model = load_model(convert_checkpoints([ck], tmp_path / "out"))
    assert model.config.noise_dependent_dropout_config == dropout
    assert model.config.to_dict()["noise_dependent_dropout_config"] == dropout
    assert json.loads(json.dumps(model.config.to_dict()))["noise_dependent_dropout_config"] == dropout
    same = ModelConfig.from_dict(model.config.to_dict())
    assert same == model.config and hash(same) == hash(model.config)
    assert graphdef_and_shapes(same) is graphdef_and_shapes(model.config)  # one cache entry
