"""In-loop evaluation of a student during LCD/LCF, every ``config.eval_every`` steps.

Quality of an LCM can get worse as training goes on while the loss still falls; this is how
a user sees it. A fixed prompt set is sampled with the LCM sampler at ``config.eval.steps``
(same seed every time) and scored:
- digits data: Fréchet distance on a digit classifier's features and that classifier's
  accuracy on the prompted class (``fd_{s}``, ``acc_{s}``; lcm_jax/eval/classifier.py);
- anything else: mean squared distance in latent space to the teacher's DDIM-50 + CFG
  samples from the same initial noise (``latent_mse_{s}``), computed once at start (LCD).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import numpy as np

from lcm_jax.data.sources import digit_caption
from lcm_jax.pipeline import LCMPipeline

Evaluator = Callable[[Any, Any], dict]  # (student unet, params) -> scalars


def digit_prompts(images_per_class: int) -> tuple[list[str], np.ndarray]:
    """The ten captions and the labels of the images a pipeline makes from them (each prompt
    repeated in place): ([10], int32 [10 * images_per_class])."""
    return [digit_caption(d) for d in range(10)], np.repeat(np.arange(10, dtype=np.int32), images_per_class)


def load_or_train_scorer(path: str, resolution: int, steps: int = 0):
    """The digit scorer at ``path``; trained on the held-out digits and saved there if absent."""
    from lcm_jax.eval.classifier import DigitScorer
    if os.path.isfile(path):
        return DigitScorer.load(path, resolution)  # raises naming the file if it is for another resolution
    logging.info("training the digit classifier for evaluation -> %s", path)
    scorer = DigitScorer.create(resolution, **({"steps": steps} if steps else {}))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    scorer.save(path)
    return scorer


def make_evaluator(config, pipe: LCMPipeline, workdir: str) -> Optional[Evaluator]:
    """The evaluator for this run, or None when ``config.eval_every`` is 0."""
    if not config.get("eval_every", 0):
        return None
    steps = [int(s) for s in config.eval.steps]
    w = float(config.eval.guidance_scale)
    n = int(config.eval.images_per_prompt)
    compiled: dict = {}  # one sampler compile per step count, reused at every evaluation

    def student_pipe(unet, params) -> LCMPipeline:
        return dataclasses.replace(pipe, unet=unet.clone(remat="none"), unet_params=params, _compiled=compiled)

    if config.data.source == "digits":
        scorer = load_or_train_scorer(config.eval.scorer or os.path.join(workdir, "scorer.safetensors"),
                                      config.data.resolution)
        prompts, labels = digit_prompts(n)

        def evaluate(unet, params) -> dict:
            lcm, out = student_pipe(unet, params), {}
            for s in steps:
                images = lcm(prompts, s, w, "lcm", seed=config.seed, num_images_per_prompt=n)
                score = scorer.score(images, labels)
                out[f"fd_{s}"], out[f"acc_{s}"] = score["fd"], score["accuracy"]
            return out
        return evaluate

    prompts = list(config.eval.prompts or config.sample_prompts)
    if pipe.is_lcm:
        raise ValueError("config.eval_every needs a reference: the digits scorer (data.source=digits) or a "
                         f"plain diffusion teacher for latent distances, but {config.pretrained!r} is an LCM")
    reference = pipe(prompts, 50, w, "ddim", seed=config.seed, num_images_per_prompt=n, output_type="latent")

    def evaluate(unet, params) -> dict:
        lcm = student_pipe(unet, params)
        return {f"latent_mse_{s}": float(np.mean((lcm(prompts, s, w, "lcm", seed=config.seed, num_images_per_prompt=n,
                                                       output_type="latent") - reference) ** 2))
                for s in steps}
    return evaluate
