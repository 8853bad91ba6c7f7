"""LCM-LoRA distillation (issue 9, item 2) through the real trainer on the tiny teacher:
the loss falls, only LoRA params are trained, the export loads in diffusers, resume is exact."""
import functools
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lcm_jax import checkpoint as ckpt_lib  # noqa: E402
from lcm_jax import distill, lora, lora_files, sharding, trainer  # noqa: E402
from lcm_jax.pipeline import LCMPipeline  # noqa: E402
from training import metrics, read_state, small_config  # noqa: E402

RANK, ALPHA, STEPS = 4, 8.0, 40  # alpha != rank: the export must carry alpha / r
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def lora_config(teacher, **overrides):
    """configs/tiny.py as an LCM-LoRA run: rank 4, fixed omega (the LCM-LoRA report's way)."""
    return small_config(teacher, **{"lora.rank": RANK, "lora.alpha": ALPHA, "lcd.omega_min": 3.0,
                                    "lcd.omega_max": 3.0, "learning_rate": 1e-3, **overrides})


@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory):
    """One 40-step LCM-LoRA run on a data x fsdp x tensor = 2 x 2 x 2 mesh, checkpointed at 20
    and 40, with 1-step sample grids and a (recording) in-loop evaluation at step 40:
    (config, workdir, final, what the evaluation saw)."""
    wd = str(tmp_path_factory.mktemp("lcm_lora"))
    cfg = lora_config(teacher, num_steps=STEPS, checkpoint_every=20, log_every=5, sample_steps=(1,),
                      eval_every=STEPS, **MESH)
    seen = {}

    def make_evaluator(config, pipe, workdir):
        def evaluate(unet, params):
            seen["unet"], seen["params"] = unet, jax.device_get(params)
            return {}
        return evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "make_evaluator", make_evaluator)
        final = trainer.train(cfg, wd)
    return cfg, wd, final, seen


def _initial_lora(teacher_params, cfg):
    """The LoRA the trainer starts from (up = 0: the student is the teacher)."""
    return lora.init_lora(teacher_params, RANK, tuple(cfg.lora.targets), rng=jax.random.PRNGKey(cfg.seed))


def _state(wd):
    state, _ = read_state(wd)
    return state


@pytest.mark.slow
def test_only_lora_is_trained_and_the_base_is_untouched(teacher, run):
    cfg, wd, final, seen = run
    state = _state(wd)
    base = LCMPipeline.from_pretrained(teacher)
    # the state holds the LoRA and AdamW's moments of it: no UNet weight, no EMA copy
    params = state["params"]
    assert {p[-1] for p in traverse_util.flatten_dict(params)} == {"down", "up"}
    assert lora.num_params(params) == lora.num_params(_initial_lora(base.unet_params, cfg))
    n_state = sum(np.size(x) for x in jax.tree.leaves(state))
    assert n_state < 3 * lora.num_params(params) + 100, "optimizer state must cover only the LoRA"
    assert "ema_params" not in str(jax.tree_util.tree_structure(state["opt_state"]))
    # sharded as the kernels they adapt: down over fsdp on `in`, up over tensor on `out`
    mesh = sharding.make_mesh(cfg.mesh)
    specs = traverse_util.flatten_dict(jax.tree.map(lambda s: tuple(s.spec), sharding.tree_shardings(params, mesh)))
    q = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "query")  # to_q
    assert specs[q + ("down",)] == ("fsdp", None) and specs[q + ("up",)] == (None, "tensor")
    conv = ("down_blocks_0", "resnets_0", "conv1")  # down [3, 3, in, r]
    assert specs[conv + ("down",)] == (None, None, "fsdp", None) and specs[conv + ("up",)] == (None, "tensor")
    # every LoRA module moved away from its start (up from 0)
    init = lora.adapted(_initial_lora(base.unet_params, cfg))
    for path, m in lora.adapted(params).items():
        assert np.abs(m["up"]).max() > 0, path
        assert not np.array_equal(m["down"], np.asarray(init[path]["down"])), path
    # final/ is the teacher's pipeline, UNet unfused (bit-identical to the teacher), plus the LoRA file
    exported = LCMPipeline.from_pretrained(final)
    assert not exported.is_lcm
    jax.tree.map(np.testing.assert_array_equal, exported.unet_params, base.unet_params)
    assert os.path.isfile(os.path.join(final, lora_files.LORA_WEIGHT_NAME))
    assert os.path.isfile(os.path.join(wd, "samples", "final_lcm1.png"))
    # the in-loop evaluation sees the merged student: the teacher's UNet (no omega embedding) + LoRA
    assert seen["unet"].config.time_cond_proj_dim is None
    want = lora.merge(base.unet_params, params, alpha=ALPHA)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), seen["params"], want)


@pytest.mark.slow
def test_lora_run_lowers_its_loss(teacher, run):
    """The consistency loss on fixed batches and draws (paired; the per-step training loss
    is too noisy over t to compare 40 steps) is lower for the trained LoRA than at its start."""
    from lcm_jax.data.input_pipeline import make_pipeline
    from lcm_jax.models.clip import tokenize
    cfg, wd, _, _ = run
    pipe = LCMPipeline.from_pretrained(teacher)
    spec = distill.DistillSpec.from_config(cfg)
    models = distill.Models(pipe.unet, pipe.unet, pipe.vae, pipe.text_encoder, pipe.schedule)
    frozen = {"teacher": pipe.unet_params, "vae": pipe.vae_params, "text": pipe.text_params,
              "uncond": pipe.encode_prompt([""])}
    batches = make_pipeline(cfg.data, functools.partial(tokenize, pipe.tokenizer), 32, seed=123,
                            caption_dropout=0.0)
    try:
        data = [next(batches) for _ in range(2)]
    finally:
        batches.close()

    encode = jax.jit(functools.partial(distill.encode_batch, models))
    loss = jax.jit(lambda tree, frozen, latents, cond, rng: distill.distill_loss(
        tree, None, frozen, latents, cond, rng, spec, models)[0])
    encoded = [encode(frozen, batch, jax.random.PRNGKey(100 + i)) for i, batch in enumerate(data)]

    def mean_loss(tree):
        return np.mean([float(loss(tree, frozen, latents, cond, jax.random.PRNGKey(10 * i + j)))
                        for i, (latents, cond) in enumerate(encoded) for j in range(4)])

    before = mean_loss(_initial_lora(pipe.unet_params, cfg))
    after = mean_loss(_state(wd)["params"])
    print(f"LCM-LoRA consistency loss on 256 fixed draws: start {before:.4g}, after {STEPS} steps {after:.4g}")
    assert after < 0.7 * before, (before, after)
    assert all(np.isfinite(r["loss"]) for r in metrics(wd))


@pytest.mark.slow
def test_exported_lora_loads_in_diffusers(teacher, run):
    """StableDiffusionPipeline.from_pretrained(final).load_lora_weights(final): its UNet gives
    our merged student's output (and so does our own pipeline's load_lora_weights)."""
    import torch
    from diffusers import StableDiffusionPipeline
    cfg, wd, final, _ = run
    trained = _state(wd)["params"]
    ours = LCMPipeline.from_pretrained(teacher)
    merged = lora.merge(ours.unet_params, trained, alpha=ALPHA)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 259], np.int64)
    c = np.asarray(ours.encode_prompt(["a handwritten digit seven", "a handwritten digit zero"]))
    run_unet = jax.jit(lambda p: ours.unet.apply({"params": p}, x, t.astype(np.int32), c))
    want = np.asarray(run_unet(merged))
    assert np.abs(want - np.asarray(run_unet(ours.unet_params))).max() > 1e-3  # the LoRA matters

    ref = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    ref.load_lora_weights(final)
    with torch.no_grad():
        got = ref.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c.copy())).sample.numpy()
    err = np.abs(got - want).max()
    print(f"exported LCM-LoRA in diffusers vs our merged student: max abs diff {err:.2e}")
    assert err <= 1e-4

    p = LCMPipeline.from_pretrained(final)
    p.load_lora_weights(final)
    p.fuse_lora()
    np.testing.assert_allclose(np.asarray(run_unet(p.unet_params)), want, atol=1e-5)


@pytest.mark.slow
def test_resume_restores_the_lora_state(teacher, run, tmp_path):
    """Back to the step-20 checkpoint of the run, resumed to 40: the same LoRA, moments and losses."""
    _, wd, _, _ = run
    split = str(tmp_path / "split")
    shutil.copytree(wd, split, ignore=shutil.ignore_patterns("final", "samples", "tensorboard"))
    shutil.rmtree(os.path.join(split, "checkpoints", str(STEPS)))
    rows = [r for r in metrics(split) if r["step"] <= 20]
    with open(os.path.join(split, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="lora.rank: checkpoint=4, now=8"):
        trainer.train(lora_config(teacher, num_steps=STEPS, checkpoint_every=20, log_every=5,
                                  **{"lora.rank": 8, **MESH}), split)
    # no grids, no evaluation this time (keys that may change on resume)
    trainer.train(lora_config(teacher, num_steps=STEPS, checkpoint_every=20, log_every=5, **MESH), split)
    a, da = read_state(wd, STEPS)
    b, db = read_state(split, STEPS)
    assert da == db
    jax.tree.map(np.testing.assert_array_equal, a, b)
    losses = lambda d: [r["loss"] for r in metrics(d) if "loss" in r]  # noqa: E731
    assert losses(wd) == losses(split)


def test_checkpoints_from_before_lora_keys_still_resume():
    """A checkpoint config without the (later added) lora section matches lora.rank = 0 only."""
    saved = {"mode": "lcd", "lcd": {"solver": "ddim"}}
    off = {**saved, "lora": {"rank": 0, "alpha": 0.0, "targets": list(lora.LCM_LORA_TARGETS)}}
    assert ckpt_lib.config_differences(saved, off) == []
    on = {**saved, "lora": {**off["lora"], "rank": 4}}
    assert "lora.rank: checkpoint='<absent>', now=4" in ckpt_lib.config_differences(saved, on)


def test_lora_configs_and_errors(teacher, tmp_path):
    from configs import lcm_lora_sd15, lcm_lora_sdxl
    c = lcm_lora_sd15.get_config()
    spec = distill.DistillSpec.from_config(c)
    assert (c.lora.rank, spec.lora_alpha, spec.omega_min, spec.omega_max) == (64, 64.0, 7.5, 7.5)
    assert c.sample_guidance == 1.0 and tuple(c.lora.targets) == lora.LCM_LORA_TARGETS
    assert lcm_lora_sdxl.get_config().data.resolution == 1024
    assert distill.DistillSpec.from_config(small_config(teacher)).lora_alpha is None  # rank 0: full LCD
    assert distill.lora_alpha(lora_config(teacher, **{"lora.alpha": 0.0})) == RANK  # alpha 0 = rank

    with pytest.raises(ValueError, match="needs mode='lcd'"):
        trainer.train(lora_config(teacher, mode="lcf"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="lora.rank must be >= 0"):
        trainer.train(lora_config(teacher, **{"lora.rank": -1}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="match no Dense/Conv module"):
        trainer.train(lora_config(teacher, **{"lora.targets": ("nope",)}), str(tmp_path / "c"))
