"""The real train loop (configs/tiny.py) on CPU: export, resume, sharding, faults, errors."""
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import trainer
from training import metrics, read_state, small_config


@pytest.mark.slow
def test_train_cli_exports_final_that_diffusers_runs(teacher, tmp_path):
    """python train.py end to end (a subprocess, as a user runs it)."""
    import subprocess
    import torch
    from diffusers import LatentConsistencyModelPipeline
    from lcm_jax.pipeline import LCMPipeline
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
           f"--config.pretrained={teacher}", "--config.tiny_teacher=False", "--config.num_steps=3",
           "--config.log_every=1", "--config.checkpoint_every=2", "--config.sample_steps=(1,)",
           "--config.sample_prompts=('a handwritten digit seven',)"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = str(tmp_path / "final")
    assert f"exported {final}" in proc.stdout
    rows = metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.isfile(tmp_path / "samples" / "final_lcm1.png")
    assert os.path.isdir(tmp_path / "tensorboard")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    ours = LCMPipeline.from_pretrained(final)
    assert ours.is_lcm and ours.unet.config.time_cond_proj_dim == 256
    pipe = LatentConsistencyModelPipeline.from_pretrained(final, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = pipe("a handwritten digit seven", num_inference_steps=1, guidance_scale=8.0, output_type="np",
               height=16, width=16, latents=torch.from_numpy(lat)).images
    got = ours("a handwritten digit seven", num_inference_steps=1, guidance_scale=8.0, latents=lat,
               height=16, width=16, output_type="np")
    np.testing.assert_allclose(got, ref, atol=2e-3)


@pytest.mark.slow
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


@pytest.mark.slow
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
        # the params barely move at this lr; Adam's moments (sums of the gradients and their
        # squares, whatever the lr) and the EMA target say the sharded gradients are the same
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7),
                     losses[name][1]["opt_state"], losses["one"][1]["opt_state"])


@pytest.mark.slow
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


@pytest.mark.slow
def test_config_mismatch_on_resume_is_an_error(teacher, tmp_path):
    trainer.train(small_config(teacher, num_steps=2), str(tmp_path))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="lcd.solver: checkpoint='ddim', now='dpm'"):
        trainer.train(small_config(teacher, num_steps=4, **{"lcd.solver": "dpm"}), str(tmp_path))


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(teacher, tmp_path):
    """Step 1's loss is finite and its state checkpointed, but its update (lr 1e30) makes step 2
    non-finite: that checkpoint holds exploded (finite) params, so it is moved out of the resume
    path (kept), and the error says no good checkpoint is left (issue 18, item 2)."""
    with pytest.raises(trainer.NonFiniteError, match="at step 2") as e:
        trainer.train(small_config(teacher, num_steps=6, learning_rate=1e30, grad_clip=0.0,
                                   checkpoint_every=1), str(tmp_path))
    assert e.value.step == 2 and e.value.last_good_step is None
    assert "the newest good checkpoint is none (a rerun starts from step 0)" in str(e.value)
    assert os.listdir(tmp_path / "checkpoints") == [] and os.listdir(tmp_path / "checkpoints_nonfinite") == ["1"]
    mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints_nonfinite"), item_names=("state",))
    params = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
    mngr.close()
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    assert all(np.isfinite(x).all() for x in leaves) and max(np.abs(x).max() for x in leaves) > 1e20
    assert not os.path.exists(tmp_path / "final")


@pytest.mark.parametrize("key,value,message", [
    ("pretrained", "/no/such/folder", "not a folder"),
    ("lcd.solver", "euler", "solver='euler'"),
    ("lcd.loss", "l1", "lcd.loss 'l1'"),
    ("remat", "some", "config.remat 'some'"),
    ("dtype", "float16", "dtype 'float16'"),
    ("mode", "cd", "mode 'cd'"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("eval.clip_model", "/no/such/clip", "/no/such/clip"),
])
def test_bad_config_fails_before_any_work(teacher, tmp_path, key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        trainer.train(small_config(teacher, eval_every=1, **{key: value}), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def _write_folder(folder, n=24):
    """Digits as PNGs with captions in metadata.jsonl, plus one unreadable file."""
    from PIL import Image
    from lcm_jax.data.sources import load_digits
    images, captions, _ = load_digits(16, "heldout")
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            name = f"sub/{i:03d}.png" if i % 2 else f"{i:03d}.png"
            Image.fromarray(images[i]).save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "text": captions[i]}) + "\n")
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not a png")


@pytest.mark.slow
def test_training_on_a_folder_of_bad_files_logs_what_it_skipped(teacher, bad_folder, tmp_path):
    """LCD through a folder seeded with one of each kind of bad file: training runs, and the
    skip/repair counts in metrics.jsonl are the pipeline's own for the same batches (a whole
    epoch of which counts exactly what was planted: test_data)."""
    from functools import partial
    from lcm_jax.data.input_pipeline import make_pipeline
    from lcm_jax.models.clip import tokenize
    from lcm_jax.pipeline import LCMPipeline
    cfg = small_config(teacher, num_steps=2, batch_size=10, checkpoint_every=0,
                       **{"data.source": "folder", "data.path": bad_folder, "data.resolution": 16})
    trainer.train(cfg, str(tmp_path))
    rows = metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    tok = partial(tokenize, LCMPipeline.from_pretrained(teacher).tokenizer)
    p = make_pipeline(cfg.data, tok, cfg.batch_size, cfg.seed, caption_dropout=0.0)
    try:
        next(p), next(p)
        want = p.counts
    finally:
        p.close()
    assert {k[len("data_"):]: v for k, v in rows[-1].items() if k.startswith("data_")} == want
    # 20 examples of the 10 usable per epoch: all of epoch 1 and part of epoch 2 were read
    planted = {"skipped_empty": 1, "skipped_corrupt": 2, "converted": 4, "upscaled": 1, "caption_missing": 1,
               "caption_not_utf8": 1}
    assert want["examples"] == 20 and all(n <= want[k] <= 2 * n for k, n in planted.items()), want


@pytest.mark.slow
def test_lcf_fine_tunes_an_lcm_on_a_folder(teacher, tmp_path):
    lcm = trainer.train(small_config(teacher, num_steps=1), str(tmp_path / "lcd"))
    data = str(tmp_path / "images")
    _write_folder(data)
    cfg = small_config(lcm, mode="lcf", num_steps=60, log_every=5, checkpoint_every=1000,
                       learning_rate=1e-3, **{"data.source": "folder", "data.path": data,
                                              "data.resolution": 16, "lcd.ema_decay": 0.9})
    final = trainer.train(cfg, str(tmp_path / "lcf"))
    losses = [r["loss"] for r in metrics(str(tmp_path / "lcf"))]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert os.path.isdir(os.path.join(final, "unet"))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_frozen_models_are_cast_once_to_the_compute_dtype(teacher, tmp_path, monkeypatch, lora_rank):
    """bfloat16 training: the frozen teacher, VAE and text encoder enter the step in bfloat16 (cast
    once, not inside every call); the trained params stay float32; LCM-LoRA's base stays float32."""
    import jax.numpy as jnp
    seen = {}

    def fit(step_fn, state, state_sh, batches, frozen, **kw):
        seen.update(frozen=frozen, params=state.params)
        raise _Stop

    monkeypatch.setattr(trainer.loop, "fit", fit)
    with pytest.raises(_Stop):
        trainer.train(small_config(teacher, dtype="bfloat16", **{"lora.rank": lora_rank}), str(tmp_path))
    dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}  # noqa: E731
    assert dtypes(seen["frozen"]["vae"]) == dtypes(seen["frozen"]["text"]) == {jnp.dtype(jnp.bfloat16)}
    base = jnp.float32 if lora_rank else jnp.bfloat16
    assert dtypes(seen["frozen"]["teacher"]) == {jnp.dtype(base)}
    assert dtypes(seen["params"]) == {jnp.dtype(jnp.float32)}
