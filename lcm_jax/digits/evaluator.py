"""The digits' in-loop evaluator (``config.eval.evaluator = "digits"``; see lcm_jax/eval/inloop.py):
the ten captions sampled with the student's sampler at ``config.eval.steps`` (same seed every
time) and scored by the digit classifier: Fréchet distance on its features and its accuracy on
the prompted class (``fd_{s}``, ``acc_{s}``)."""
from __future__ import annotations

import logging
import os

import jax
import numpy as np

from lcm_jax.data.sources import digit_caption
from lcm_jax.digits.classifier import DigitScorer
from lcm_jax.pipeline import LCMPipeline


def digit_prompts(images_per_class: int) -> tuple[list[str], np.ndarray]:
    """The ten captions and the labels of the images a pipeline makes from them (each prompt
    repeated in place): ([10], int32 [10 * images_per_class])."""
    return [digit_caption(d) for d in range(10)], np.repeat(np.arange(10, dtype=np.int32), images_per_class)


def load_or_train_scorer(path: str, resolution: int, steps: int = 0) -> DigitScorer:
    """The digit scorer at ``path``; trained on the held-out digits and saved there if absent."""
    if os.path.isfile(path):
        return DigitScorer.load(path, resolution)  # raises naming the file if it is for another resolution
    logging.info("training the digit classifier for evaluation -> %s", path)
    scorer = DigitScorer.create(resolution, **({"steps": steps} if steps else {}))
    if jax.process_index() == 0:  # one writer (each process trained the same scorer)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        scorer.save(path)
    return scorer


def make_evaluator(config, pipe: LCMPipeline, workdir: str):
    """(student unet, params) -> {fd_s, acc_s}; the scorer is ``config.eval.scorer`` (empty:
    WORKDIR/scorer.safetensors, trained once), loaded now so a bad file fails before training."""
    scorer = load_or_train_scorer(config.eval.scorer or os.path.join(workdir, "scorer.safetensors"),
                                  config.data.resolution)
    steps, w, n = [int(s) for s in config.eval.steps], float(config.eval.guidance_scale), int(config.eval.images_per_prompt)
    prompts, labels = digit_prompts(n)

    def evaluate(unet, params) -> dict:
        lcm, out = pipe.with_unet(unet, params), {}  # one sampler compile per step count, reused each time
        for s in steps:
            images = lcm(prompts, s, w, config.sample_scheduler, seed=config.seed, num_images_per_prompt=n)
            score = scorer.score(images, labels)
            out[f"fd_{s}"], out[f"acc_{s}"] = score["fd"], score["accuracy"]
        return out
    return evaluate
