"""In-loop evaluation of a student during LCD/LCF, every ``config.eval_every`` steps.

Quality of an LCM can get worse as training goes on while the loss still falls; this is how a user
sees it. ``config.eval.evaluator`` names the evaluator, a module with ``make_evaluator(config, pipe,
workdir) -> evaluate(student unet, params) -> {name: scalar}`` (big_vision's way: chosen by config,
not by data set), made before training starts so a bad scorer fails first:
- "reference" (here): a fixed prompt set sampled with the student's sampler
  (``config.sample_scheduler``) at ``config.eval.steps`` (same seed every time), scored by the mean
  squared distance in latent space to the teacher's DDIM-50 + CFG samples from the same initial
  noise (``latent_mse_{s}``; LCD from a plain diffusion teacher, computed once at start) and, when
  ``config.eval.clip_model`` names a transformers CLIP folder, the CLIP score of the decoded images
  against their prompts (``clip_score_{s}``, torchmetrics' definition; eval/clip_score.py);
- "digits": the digit classifier's FD and accuracy (lcm_jax/digits/evaluator.py);
- any other dotted name: that module, e.g. ``--config.eval.evaluator=my_project.my_eval``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional

import numpy as np

from lcm_jax.pipeline import LCMPipeline

Evaluator = Callable[[Any, Any], dict]  # (student unet, params) -> scalars
EVALUATORS = {"reference": __name__, "digits": "lcm_jax.digits.evaluator"}


def evaluator_module(name: str) -> str:
    """The module ``config.eval.evaluator`` names (a ValueError for a name that is neither known nor dotted)."""
    if name in EVALUATORS:
        return EVALUATORS[name]
    if "." not in name:
        raise ValueError(f"config.eval.evaluator {name!r}: expected one of {' | '.join(EVALUATORS)} or a module "
                         "path (a.b) with make_evaluator(config, pipe, workdir)")
    return name


def make_evaluator(config, pipe: LCMPipeline, workdir: str) -> Optional[Evaluator]:
    """The evaluator for this run, or None when ``config.eval_every`` is 0."""
    if not config.eval_every:
        return None
    module = evaluator_module(config.eval.evaluator)
    if module != __name__:
        return importlib.import_module(module).make_evaluator(config, pipe, workdir)
    return make_reference_evaluator(config, pipe, workdir)


def make_reference_evaluator(config, pipe: LCMPipeline, workdir: str) -> Evaluator:
    """latent_mse_{s} against the teacher's samples and (eval.clip_model) clip_score_{s}; see the module doc."""
    del workdir
    steps = [int(s) for s in config.eval.steps]
    w = float(config.eval.guidance_scale)
    scheduler = config.sample_scheduler  # mlcd for a multistep student
    n = int(config.eval.images_per_prompt)
    prompts = list(config.eval.prompts or config.sample_prompts)
    clip_folder = config.eval.clip_model
    if pipe.is_lcm and not clip_folder:
        raise ValueError("config.eval_every needs a reference: a CLIP model folder (config.eval.clip_model), a "
                         "plain diffusion teacher for latent distances, or another config.eval.evaluator (digits), "
                         f"but {config.pretrained!r} is an LCM and eval.clip_model is empty")
    clip = None
    if clip_folder:
        from lcm_jax.eval.clip_score import CLIPScorer
        clip = CLIPScorer.from_pretrained(clip_folder)  # raises now, naming the folder, if it is not one
    reference = None if pipe.is_lcm else pipe(prompts, 50, w, "ddim", seed=config.seed, num_images_per_prompt=n,
                                             output_type="latent")
    image_prompts = [p for p in prompts for _ in range(n)]  # the pipeline repeats each prompt in place

    def evaluate(unet, params) -> dict:
        lcm, out = pipe.with_unet(unet, params), {}  # one sampler compile per step count, reused each time
        sample = functools.partial(lcm, prompts, guidance_scale=w, scheduler=scheduler, seed=config.seed,
                                   num_images_per_prompt=n)
        for s in steps:
            if reference is not None:
                out[f"latent_mse_{s}"] = float(np.mean((sample(s, output_type="latent") - reference) ** 2))
            if clip is not None:
                out[f"clip_score_{s}"] = clip.score(sample(s), image_prompts)
        return out
    return evaluate
