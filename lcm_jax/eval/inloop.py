"""In-loop evaluation of a student during LCD/LCF, every ``config.eval_every`` steps.

Quality of an LCM can get worse as training goes on while the loss still falls; this is how
a user sees it. A fixed prompt set is sampled with the LCM sampler (``config.sample_scheduler``) at ``config.eval.steps``
(same seed every time) and scored:
- digits data: Fréchet distance on a digit classifier's features and that classifier's
  accuracy on the prompted class (``fd_{s}``, ``acc_{s}``; lcm_jax/eval/classifier.py);
- anything else: mean squared distance in latent space to the teacher's DDIM-50 + CFG
  samples from the same initial noise (``latent_mse_{s}``), computed once at start (LCD, a
  plain diffusion teacher), and, when ``config.eval.clip_model`` names a transformers CLIP
  folder, the CLIP score of the decoded images against their prompts (``clip_score_{s}``,
  torchmetrics' definition; lcm_jax/eval/clip_score.py). The folder is loaded (and a bad one
  raises) when the evaluator is made, before training starts.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Optional

import jax
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
    if jax.process_index() == 0:  # one writer (each process trained the same scorer)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        scorer.save(path)
    return scorer


def make_evaluator(config, pipe: LCMPipeline, workdir: str) -> Optional[Evaluator]:
    """The evaluator for this run, or None when ``config.eval_every`` is 0."""
    if not config.eval_every:
        return None
    steps = [int(s) for s in config.eval.steps]
    w = float(config.eval.guidance_scale)
    scheduler = config.sample_scheduler  # mlcd for a multistep student
    n = int(config.eval.images_per_prompt)

    def student_pipe(unet, params) -> LCMPipeline:  # one sampler compile per step count, reused each time
        return pipe.with_unet(unet, params)

    if config.data.source == "digits":
        scorer = load_or_train_scorer(config.eval.scorer or os.path.join(workdir, "scorer.safetensors"),
                                      config.data.resolution)
        prompts, labels = digit_prompts(n)

        def evaluate(unet, params) -> dict:
            lcm, out = student_pipe(unet, params), {}
            for s in steps:
                images = lcm(prompts, s, w, scheduler, seed=config.seed, num_images_per_prompt=n)
                score = scorer.score(images, labels)
                out[f"fd_{s}"], out[f"acc_{s}"] = score["fd"], score["accuracy"]
            return out
        return evaluate

    prompts = list(config.eval.prompts or config.sample_prompts)
    clip_folder = config.eval.clip_model
    if pipe.is_lcm and not clip_folder:
        raise ValueError("config.eval_every needs a reference: the digits scorer (data.source=digits), a CLIP "
                         "model folder (config.eval.clip_model) or a plain diffusion teacher for latent "
                         f"distances, but {config.pretrained!r} is an LCM and eval.clip_model is empty")
    clip = None
    if clip_folder:
        from lcm_jax.eval.clip_score import CLIPScorer
        clip = CLIPScorer.from_pretrained(clip_folder)  # raises now, naming the folder, if it is not one
    reference = None if pipe.is_lcm else pipe(prompts, 50, w, "ddim", seed=config.seed, num_images_per_prompt=n,
                                             output_type="latent")
    image_prompts = [p for p in prompts for _ in range(n)]  # the pipeline repeats each prompt in place

    def evaluate(unet, params) -> dict:
        lcm, out = student_pipe(unet, params), {}
        sample = functools.partial(lcm, prompts, guidance_scale=w, scheduler=scheduler, seed=config.seed,
                                   num_images_per_prompt=n)
        for s in steps:
            if reference is not None:
                out[f"latent_mse_{s}"] = float(np.mean((sample(s, output_type="latent") - reference) ** 2))
            if clip is not None:
                out[f"clip_score_{s}"] = clip.score(sample(s), image_prompts)
        return out
    return evaluate
