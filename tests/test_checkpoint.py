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
    ck.save(1, a, {"epoch": 0, "offset": 8}, CONFIG)
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
    ck.save(1, a, {"epoch": 0, "offset": 1}, CONFIG)
    b = jax.tree.map(lambda x: x + 1, a)
    ck.save(2, b, {"epoch": 0, "offset": 2}, CONFIG)
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
    ck.save(1, a, {"epoch": 0, "offset": 1}, CONFIG)
    ck.close()
    for root, _, files in os.walk(tmp_path / "1"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(RuntimeError, match="refusing to start from scratch"):
        ckpt_lib.Checkpointer(str(tmp_path)).restore(ckpt_lib.abstract_like(a, sh), CONFIG)


def test_config_differences_ignore_resumable_keys():
    """The optimizer settings a user lowers after a divergence may change (and are logged)."""
    now = {**CONFIG, "learning_rate": 2e-3, "num_steps": 10, "mesh": {"data": 4, "fsdp": 2},
           "lcd": {"solver": "dpm"}}
    assert ckpt_lib.config_differences(CONFIG, now) == ["lcd.solver: checkpoint='ddim', now='dpm'"]
    assert ckpt_lib._differences(CONFIG, now, ckpt_lib.OPTIMIZER_KEYS) == [
        "learning_rate: checkpoint=0.001, now=0.002"]


def test_retention_keeps_the_newest_and_quarantine_moves_aside(tmp_path):
    """keep < 1 is refused (orbax's max_to_keep=0 deleted everything); prune keeps the newest
    ``keep``; quarantine moves steps out of the resume path without deleting them."""
    with pytest.raises(ValueError, match="keep_checkpoints=0: expected >= 1"):
        ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=0)
    a, _ = _state(_mesh(data=8))
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
    for step in (1, 2, 3):
        ck.save(step, a, {"offset": step}, CONFIG)
    ck.prune()
    assert ck.steps() == [2, 3]
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="config.num_steps=2, but .* already holds step 3"):
        ck.check_within(2)
    ck.check_within(3)
    assert ck.quarantine(3) == [str(tmp_path / "ck_nonfinite" / "3")]
    assert ck.steps() == [2] and (tmp_path / "ck_nonfinite" / "3" / "state").is_dir()
    ck.save(3, a, {"offset": 3}, CONFIG)
    assert ck.quarantine(3) == [str(tmp_path / "ck_nonfinite" / "3.1")]  # an earlier one is kept too
    ck.close()


def test_fingerprint_follows_content_not_location(tmp_path):
    def folder(name, weights):
        for comp in ("unet", "vae"):
            (tmp_path / name / comp).mkdir(parents=True)
            (tmp_path / name / comp / "config.json").write_text('{"a": 1}')
            (tmp_path / name / comp / "w.safetensors").write_bytes(weights)
        (tmp_path / name / "README.md").write_text(name)  # outside the components: not part of it
        return str(tmp_path / name)
    big = np.random.default_rng(0).bytes(3 << 20)  # sampled, not read whole
    fp = lambda d: ckpt_lib.fingerprint(d, ("unet", "vae", "text_encoder"))  # noqa: E731
    a = fp(folder("a", big))
    assert a == fp(folder("moved", big))
    assert a != fp(folder("b", big[::-1]))  # another model of the same size
    assert fp(folder("c", b"small")) != fp(folder("d", b"smalL"))  # small files: read whole


def test_a_model_of_another_shape_is_a_clear_error(tmp_path):
    """Same config, other params (config.pretrained is a resumable key: a new path to the same
    teacher must resume, another teacher must not): the error lists the params that differ."""
    mesh = _mesh(data=8)
    a, _ = _state(mesh)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, every=1)
    ck.save(1, a, {"epoch": 0, "offset": 1}, CONFIG)
    ck.close()
    b = {"params": {**a["params"], "conv": {"kernel": np.zeros((3, 3, 8, 32), np.float32),
                                            "bias": np.zeros((32,), np.float32)},
                    "extra": {"scale": np.ones((4,), np.float32)}}, "step": np.int32(0)}
    sh = sharding.tree_shardings(b, mesh)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="another shape") as e:
        ckpt_lib.Checkpointer(str(tmp_path)).restore(ckpt_lib.abstract_like(b, sh), CONFIG)
    assert "params/conv/kernel: checkpoint=(3, 3, 8, 16), now=(3, 3, 8, 32)" in str(e.value)
    assert "params/extra/scale: checkpoint=<absent>, now=(4,)" in str(e.value)


def test_checkpoints_from_before_the_declared_data_keys_still_resume():
    """Data keys whose defaults moved from code into configs/common.py: absent from an older checkpoint's
    config, they match their default only; the decode knobs may change on resume (the order does not)."""
    saved = {**CONFIG, "data": {"source": "folder", "resolution": 16}}
    now = {**saved, "data": {**saved["data"], "missing_caption": "empty", "split": "train", "tfds_name": "",
                             "image_key": "image", "caption_key": "caption", "num_threads": 4,
                             "worker_count": 2, "prefetch": 0}}
    assert ckpt_lib.config_differences(saved, now) == []
    skip = {**now, "data": {**now["data"], "missing_caption": "skip"}}
    assert ckpt_lib.config_differences(saved, skip) == [
        "data.missing_caption: checkpoint='<absent>', now='skip'"]
