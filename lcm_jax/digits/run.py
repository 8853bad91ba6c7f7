"""The digits reproduction of the LCM paper's Table 1 (configs/digits.py): the stages in order.

teacher (digits/teacher.py) -> LCD (trainer.train, the same code as the SD configs) ->
ablations (trainer.train per solver Psi / skipping step k, reduced budget) -> beyond LCM
(multistep LCD with S segments and data-free LCD from the teacher's own samples, the same
budget) -> evaluation (digits/table.py). Each stage is resumable and skipped when its
output exists.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time

import jax

from lcm_jax import atomic
from lcm_jax import trainer
from lcm_jax.digits import table
from lcm_jax.digits import teacher as teacher_lib
from lcm_jax.digits.evaluator import load_or_train_scorer
from lcm_jax.pipeline import LCMPipeline


def _done(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model_index.json"))


def lcd_config(config, teacher: str, scorer: str):
    """The LCD config of the main run: this config with the teacher and the shared scorer filled in."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.pretrained = teacher
        c.eval.scorer = scorer
    return c


def _train_timesteps(config) -> int:
    return int(config.teacher.scheduler.get("num_train_timesteps", 1000))


def main_skipping_step(config) -> int:
    """The main LCD run's skipping step k = T / N."""
    return _train_timesteps(config) // config.lcd.num_ddim_timesteps


def ablation_name(solver: str, k: int) -> str:
    """The ablation run of solver Psi and skipping step k."""
    return f"solver={solver} k={k}"


def ablation_configs(config, teacher: str, scorer: str) -> dict[str, object]:
    """{name: config}: one LCD run per solver (at k = T / N of the main run) and per skipping step k
    (with DDIM), at ``config.ablation.num_steps``; the (ddim, main k) run appears once."""
    base = lcd_config(config, teacher, scorer)
    T = _train_timesteps(config)
    main_k = main_skipping_step(config)
    runs = {}
    for solver, k in [(s, main_k) for s in config.ablation.solvers] + [("ddim", k) for k in config.ablation.skipping_steps]:
        if T % k:
            raise ValueError(f"ablation skipping step k={k} does not divide T={T}")
        c = copy.deepcopy(base)
        with c.unlocked():
            c.num_steps = config.ablation.num_steps
            c.lcd.solver = solver
            c.lcd.num_ddim_timesteps = T // k
            c.eval_every = 0
            c.sample_steps = ()  # no grids: the evaluation scores these runs
            c.checkpoint_every = config.ablation.num_steps
        runs.setdefault(ablation_name(solver, k), c)
    return runs


def beyond_configs(config, teacher: str, scorer: str) -> dict[str, object]:
    """{name: config}: the LCM successors of ``config.beyond`` as options of the same LCD run, at
    ``beyond.num_steps``: MLCD with S segments (no EMA, sampled with S steps of "mlcd") and LCD
    on latents the teacher generates from the ten captions alone (data.source = "teacher")."""
    b = config.get("beyond")
    if b is None:
        return {}
    base = lcd_config(config, teacher, scorer)
    with base.unlocked():
        base.num_steps = b.num_steps
        base.eval_every = 0
        base.sample_steps = ()
        base.checkpoint_every = b.num_steps
    runs = {}
    for s in b.segments:
        c = copy.deepcopy(base)
        with c.unlocked():
            c.lcd.num_segments = int(s)
            c.lcd.target = "online"
            c.sample_scheduler = "mlcd"
        runs[f"MLCD S={s}"] = c
    if b.datafree:
        from lcm_jax.data.sources import digit_caption
        c = copy.deepcopy(base)
        with c.unlocked():
            c.data.source = "teacher"
            c.data.path = ""  # the run's WORKDIR/teacher_data
            c.data.prompts = tuple(digit_caption(d) for d in range(10))
            c.data.num_examples = int(b.datafree_examples)
            c.data.teacher_scheduler = b.teacher_scheduler
            c.data.teacher_steps = int(b.teacher_steps)
            c.data.teacher_guidance = float(b.teacher_guidance)
        runs["data-free LCD"] = c
    return runs


def run(config, workdir: str) -> str:
    """All stages; returns WORKDIR/results.md. A signal raises ``errors.Interrupted`` with the
    current stage's step saved: rerun to continue."""
    os.makedirs(workdir, exist_ok=True)  # (train.py turns on the persistent compilation cache: compile_cache.py)
    timings_path = os.path.join(workdir, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}

    def timed(name, fn, *args):
        t0 = time.time()
        out = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        if jax.process_index() == 0:
            with atomic.file(timings_path) as tmp, open(tmp, "w") as f:  # read back by every rerun
                json.dump(timings, f, indent=2)
        return out

    # ------------------------------------------------------------------ stage 1: teacher
    teacher_dir = timed("teacher", teacher_lib.train_teacher, config, workdir)
    scorer_path = os.path.join(workdir, "scorer.safetensors")
    timed("scorer", load_or_train_scorer, scorer_path, config.data.resolution, config.table.classifier_steps)

    # ------------------------------------------------------------------ stage 2: LCD
    final = os.path.join(workdir, "final")
    if not _done(final):
        final = timed("lcd", trainer.train, lcd_config(config, teacher_dir, scorer_path), workdir)

    def train_runs(runs: dict, folder: str, label: str) -> dict:
        """{name: WORKDIR/folder/<name>/final}, each trained unless exported."""
        outs = {}
        for name, c in runs.items():
            d = os.path.join(workdir, folder, name.replace(" ", "_").replace("=", ""))
            out = os.path.join(d, "final")
            if not _done(out):
                logging.info("%s %s: %d LCD steps in %s", label, name, c.num_steps, d)
                out = timed(f"{label} {name}", trainer.train, c, d)
            outs[name] = out
        return outs

    # ------------------------------------------------------------------ stage 3: ablations
    ablations = train_runs(ablation_configs(config, teacher_dir, scorer_path), "ablations", "ablation")

    # ------------------------------------------------------------------ stage 3b: beyond LCM
    beyond_runs = beyond_configs(config, teacher_dir, scorer_path)
    trained = train_runs(beyond_runs, "beyond", "beyond")
    beyond = {name: (out, beyond_runs[name].sample_scheduler) for name, out in trained.items()}

    # ------------------------------------------------------------------ stage 4: evaluation
    def evaluate():
        teacher = LCMPipeline.from_pretrained(teacher_dir)
        def student(folder):  # the teacher's components; the students share its compiled samplers
            s = LCMPipeline.from_pretrained(folder)
            return teacher.with_unet(s.unet, s.unet_params, s.guidance_range)

        lcms = {name: student(folder) for name, folder in {"LCM": final, **ablations}.items()}
        b = config.get("beyond")
        extra = {}
        if beyond:  # beside them, the LCD run of the same budget (the ablation's, when it is one)
            same = ablation_name("ddim", main_skipping_step(config))
            if same in ablations and int(config.ablation.num_steps) == int(b.num_steps):
                extra["LCD"] = (lcms[same], "lcm")
                extra["LCD, mlcd sampler"] = (lcms[same], "mlcd")  # the deterministic sampler alone
            extra.update({name: (student(folder), sched) for name, (folder, sched) in beyond.items()})
        scorer = load_or_train_scorer(scorer_path, config.data.resolution)
        results = table.evaluate(config.table, teacher, lcms, scorer, workdir, config.data.resolution,
                                 ablation_steps=config.ablation.sample_steps, beyond=extra,
                                 beyond_steps=b.sample_steps if b is not None else (),
                                 beyond_guidances=b.get("guidance_scales", ()) if b is not None else ())
        results["ablation_steps_trained"] = int(config.ablation.num_steps)
        if b is not None:
            results["beyond_steps_trained"] = int(b.num_steps)
        results["lcd_steps"] = int(config.num_steps)
        return results

    results_md = os.path.join(workdir, "results.md")
    if os.path.isfile(os.path.join(workdir, "results.json")) and os.path.isfile(results_md):
        logging.info("evaluation: %s exists, skipping (delete results.json to evaluate again)", results_md)
        return results_md
    results = timed("evaluation", evaluate)
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    if jax.process_index() == 0:
        table.write(results, workdir)
        logging.info("results: %s", results_md)
    return results_md
