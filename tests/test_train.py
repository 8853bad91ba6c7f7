"""The real train loop (configs/tiny.py) on CPU: export, resume, sharding, faults, errors."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import tiny  # noqa: E402
from lcm_jax import checkpoint as ckpt_lib  # noqa: E402
from lcm_jax import trainer  # noqa: E402
from lcm_jax.data.sources import DIGIT_WORDS  # noqa: E402
from lcm_jax.tiny import make_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("teacher"))
    make_tiny_pipeline(d, DIGIT_WORDS, resolution=16, seed=0)
    return d


def small_config(teacher, **overrides):
    c = tiny.get_config()
    c.pretrained = teacher
    c.tiny_teacher = False
    c.num_steps = 3
    c.batch_size = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.sample_prompts = ("a handwritten digit seven",)
    c.sample_steps = (1,)
    c.mesh.data = 1
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def read_state(workdir, step=None):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data", "config"))
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    mngr.close()
    return out["state"], out["data"]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_exports_final_that_diffusers_runs(teacher, tmp_path):
    from diffusers import LatentConsistencyModelPipeline
    from lcm_jax.pipeline import LCMPipeline
    final = trainer.train(small_config(teacher), str(tmp_path))
    assert final == str(tmp_path / "final")
    rows = metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.isfile(tmp_path / "samples" / "final_lcm1.png")
    assert os.path.isdir(tmp_path / "tensorboard")
    ours = LCMPipeline.from_pretrained(final)
    assert ours.is_lcm and ours.unet.config.time_cond_proj_dim == 256
    pipe = LatentConsistencyModelPipeline.from_pretrained(final, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    import torch
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = pipe("a handwritten digit seven", num_inference_steps=1, guidance_scale=8.0, output_type="np",
               height=16, width=16, latents=torch.from_numpy(lat)).images
    got = ours("a handwritten digit seven", num_inference_steps=1, guidance_scale=8.0, latents=lat,
               height=16, width=16, output_type="np")
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_resume_is_exact_and_keeps_data_order(teacher, tmp_path):
    straight = str(tmp_path / "straight")
    trainer.train(small_config(teacher, num_steps=4), straight)
    split = str(tmp_path / "split")
    trainer.train(small_config(teacher, num_steps=2), split)
    trainer.train(small_config(teacher, num_steps=4), split)  # resumes from step 2
    a, da = read_state(straight, 4)
    b, db = read_state(split, 4)
    assert da == db
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert [r["loss"] for r in metrics(straight)][2:] == [r["loss"] for r in metrics(split)][2:]


def test_sharded_equals_single_device(teacher, tmp_path):
    losses = {}
    for name, mesh in {"one": dict(data=1, fsdp=1, tensor=1), "dp8": dict(data=8, fsdp=1, tensor=1),
                       "dp4fsdp2": dict(data=4, fsdp=2, tensor=1)}.items():
        wd = str(tmp_path / name)
        # a small learning rate: Adam's first steps (~lr * sign(g)) would amplify the last-bit
        # differences of a sharded reduction order into params far above the tolerance
        trainer.train(small_config(teacher, learning_rate=1e-6,
                                   **{f"mesh.{k}": v for k, v in mesh.items()}), wd)
        losses[name] = ([r["loss"] for r in metrics(wd)], read_state(wd, 3)[0])
    for name in ("dp8", "dp4fsdp2"):
        np.testing.assert_allclose(losses[name][0], losses["one"][0], rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
                     losses[name][1]["params"], losses["one"][1]["params"])


def test_corrupt_latest_checkpoint_falls_back(teacher, tmp_path, caplog):
    wd = str(tmp_path)
    trainer.train(small_config(teacher, num_steps=4, checkpoint_every=2), wd)
    ckdir = tmp_path / "checkpoints" / "4"
    for root, _, files in os.walk(ckdir):  # truncate every data file of the newest step
        for f in files:
            p = os.path.join(root, f)
            with open(p, "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(p) // 3))
    cfg = small_config(teacher, num_steps=5, checkpoint_every=100)
    with caplog.at_level("WARNING"):
        trainer.train(cfg, wd)
    assert any("step 4" in r.getMessage() and ("corrupt" in r.getMessage() or "unreadable" in r.getMessage())
               for r in caplog.records)
    assert [r["step"] for r in metrics(wd)][-3:] == [3, 4, 5]  # resumed from step 2


def test_config_mismatch_on_resume_is_an_error(teacher, tmp_path):
    trainer.train(small_config(teacher, num_steps=2), str(tmp_path))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="lcd.solver: checkpoint='ddim', now='dpm'"):
        trainer.train(small_config(teacher, num_steps=4, **{"lcd.solver": "dpm"}), str(tmp_path))


def test_non_finite_loss_stops_naming_the_step(teacher, tmp_path):
    wd = str(tmp_path)
    trainer.train(small_config(teacher, num_steps=2), wd)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(trainer.NonFiniteError, match=r"at step \d+"):
        trainer.train(small_config(teacher, num_steps=6, learning_rate=1e30, grad_clip=0.0,
                                   checkpoint_every=100), wd)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert not os.path.exists(tmp_path / "final")


@pytest.mark.parametrize("key,value,message", [
    ("pretrained", "/no/such/folder", "not a folder"),
    ("lcd.solver", "euler", "solver='euler'"),
    ("lcd.loss", "l1", "lcd.loss 'l1'"),
    ("remat", "some", "config.remat 'some'"),
    ("dtype", "float16", "dtype 'float16'"),
    ("mode", "cd", "mode 'cd'"),
    ("batch_size", 0, "batch_size must be >= 1"),
])
def test_bad_config_fails_before_any_work(teacher, tmp_path, key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        trainer.train(small_config(teacher, **{key: value}), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
