"""Checkpointer: cross-mesh restore, validated fallback, config checks (no training needed)."""
import os

import jax
import ml_collections
import numpy as np
import pytest

from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import sharding


def _state(mesh):
    rng = np.random.default_rng(0)
    tree = {"params": {"conv": {"kernel": rng.standard_normal((3, 3, 8, 16)).astype(np.float32),
                                "bias": rng.standard_normal((16,)).astype(np.float32)},
                       "emb": {"embedding": rng.standard_normal((32, 8)).astype(np.float32)}},
            "step": np.int32(7)}
    shardings = sharding.tree_shardings(tree, mesh)
    return sharding.put(tree, shardings), shardings


def _mesh(**sizes):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **sizes}))


CONFIG = {"mode": "lcd", "learning_rate": 1e-3, "mesh": {"data": 8}, "lcd": {"solver": "ddim"}}


@pytest.mark.parametrize("mesh_b", [dict(data=4, fsdp=2), dict(data=2, fsdp=2, tensor=2)])
def test_cross_mesh_restore(tmp_path, mesh_b):
    a, _ = _state(_mesh(data=8))
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, every=1)
    ck.save(1, a, {"epoch": 0, "offset": 8}, CONFIG, force=True)
    ck.close()
    b_template, b_shardings = _state(_mesh(**mesh_b))
    assert not b_shardings["params"]["conv"]["kernel"].is_fully_replicated
    restored, data, step = ckpt_lib.Checkpointer(str(tmp_path)).restore(
        ckpt_lib.abstract_like(b_template, b_shardings), {**CONFIG, "mesh": mesh_b})
    assert step == 1 and data == {"epoch": 0, "offset": 8}
    assert restored["params"]["conv"]["kernel"].sharding == b_shardings["params"]["conv"]["kernel"]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), restored, a)


def test_truncated_latest_falls_back_with_a_warning(tmp_path, caplog):
    mesh = _mesh(data=8)
    a, sh = _state(mesh)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3, every=1)
    ck.save(1, a, {"epoch": 0, "offset": 1}, CONFIG, force=True)
    b = jax.tree.map(lambda x: x + 1, a)
    ck.save(2, b, {"epoch": 0, "offset": 2}, CONFIG, force=True)
    ck.close()
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "r+b") as fh:
                fh.truncate(os.path.getsize(p) // 3)
    with caplog.at_level("WARNING"):
        restored, data, step = ckpt_lib.Checkpointer(str(tmp_path)).restore(ckpt_lib.abstract_like(a, sh), CONFIG)
    assert step == 1 and data["offset"] == 1
    assert any("step 2" in r.getMessage() for r in caplog.records)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), restored, a)


def test_no_valid_checkpoint_refuses_to_start_from_scratch(tmp_path):
    mesh = _mesh(data=8)
    a, sh = _state(mesh)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3, every=1)
    ck.save(1, a, {"epoch": 0, "offset": 1}, CONFIG, force=True)
    ck.close()
    for root, _, files in os.walk(tmp_path / "1"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(RuntimeError, match="refusing to start from scratch"):
        ckpt_lib.Checkpointer(str(tmp_path)).restore(ckpt_lib.abstract_like(a, sh), CONFIG)


def test_config_differences_ignore_resumable_keys():
    now = {**CONFIG, "learning_rate": 2e-3, "num_steps": 10, "mesh": {"data": 4, "fsdp": 2},
           "lcd": {"solver": "dpm"}}
    diffs = ckpt_lib.config_differences(CONFIG, now)
    assert diffs == ["lcd.solver: checkpoint='ddim', now='dpm'",
                     "learning_rate: checkpoint=0.001, now=0.002"]


def test_a_model_of_another_shape_is_a_clear_error(tmp_path):
    """Same config, other params (config.pretrained is a resumable key: a new path to the same
    teacher must resume, another teacher must not): the error lists the params that differ."""
    mesh = _mesh(data=8)
    a, _ = _state(mesh)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, every=1)
    ck.save(1, a, {"epoch": 0, "offset": 1}, CONFIG, force=True)
    ck.close()
    b = {"params": {**a["params"], "conv": {"kernel": np.zeros((3, 3, 8, 32), np.float32),
                                            "bias": np.zeros((32,), np.float32)},
                    "extra": {"scale": np.ones((4,), np.float32)}}, "step": np.int32(0)}
    sh = sharding.tree_shardings(b, mesh)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="another shape") as e:
        ckpt_lib.Checkpointer(str(tmp_path)).restore(ckpt_lib.abstract_like(b, sh), CONFIG)
    assert "params/conv/kernel: checkpoint=(3, 3, 8, 16), now=(3, 3, 8, 32)" in str(e.value)
    assert "params/extra/scale: checkpoint=<absent>, now=(4,)" in str(e.value)
