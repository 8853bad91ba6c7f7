"""The digits Table 1: samplers x steps, scored by Fréchet distance and accuracy, written out.

Rows as the paper's Table 1 (teacher DDIM / DPM-Solver / DPM-Solver++ with CFG, and the LCM,
all at guidance w), columns FD and accuracy at each step count, mean ± std over sampling
seeds; beside it the numbers that say how to read it: the FD floor of real digits (another
sample of the same size, and the same images through the autoencoder), the teacher's
DDIM-50 at several w, and the ablation runs (solver Psi, skipping step k).
Outputs: results.json, results.md, grids/<row>_<steps>.png, fd_vs_steps.png.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import tqdm

from lcm_jax import atomic
from lcm_jax.data.sources import load_digits
from lcm_jax.digits.evaluator import digit_prompts
from lcm_jax.images import save_grid
from lcm_jax.pipeline import LCMPipeline

TEACHER_ROWS = {"DDIM": "ddim", "DPM-Solver": "dpm", "DPM-Solver++": "dpm++"}
GRID_PER_CLASS = 8


def score_sampler(pipe: LCMPipeline, scorer, scheduler: str, steps: int, w: float, per_class: int,
                  seeds, grid_path: Optional[str] = None) -> tuple[dict, np.ndarray]:
    """FD and accuracy per seed of ``per_class`` images of each digit, and the first seed's
    images (uint8 [10 * per_class, H, W, 3]; a grid of them at ``grid_path``)."""
    prompts, labels = digit_prompts(per_class)
    fds, accs, first = [], [], None
    for i, seed in enumerate(seeds):
        images = pipe(prompts, steps, w, scheduler, seed=int(seed), num_images_per_prompt=per_class)
        score = scorer.score(images, labels)
        fds.append(float(score["fd"]))
        accs.append(float(score["accuracy"]))
        if i == 0:
            first = images
        if i == 0 and grid_path:
            k = min(per_class, GRID_PER_CLASS)
            save_grid(images.reshape(10, per_class, *images.shape[1:])[:, :k].reshape(-1, *images.shape[1:]),
                      10, grid_path)
    return {"fd": fds, "acc": accs}, first


def floor_rows(pipe: LCMPipeline, scorer, resolution: int, per_class: int, seed: int = 0) -> dict:
    """Real digits scored like samples: a class-balanced draw of the training digits (the
    sample-size floor), and the same images through the teacher's autoencoder (posterior mode)."""
    images, _, labels = load_digits(resolution, "train")
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == d), per_class, replace=False) for d in range(10)])
    real, y = images[idx], labels[idx]
    vae = pipe.vae
    x = real.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0

    @jax.jit
    def reconstruct(params, x):
        return vae.apply({"params": params}, x)  # encode -> mode -> decode, [N, 3, H, W]

    recon = np.asarray(reconstruct(pipe.vae_params, x)).transpose(0, 2, 3, 1)
    recon = np.round(np.clip(recon / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    rows = {}
    for name, imgs in (("real digits (same sample size)", real), ("real digits through the autoencoder", recon)):
        s = scorer.score(imgs, y)
        rows[name] = {"fd": [float(s["fd"])], "acc": [float(s["accuracy"])]}
    return rows


def trajectory_mse(samples: dict[str, dict[str, np.ndarray]], reference: np.ndarray) -> dict:
    """Mean squared distance, in [0, 1] pixels, from the teacher's DDIM-50 sample to each
    sampler's sample from the same initial noise (the same seed): how closely each follows the
    teacher's PF-ODE, not just the data. ``samples``: {sampler: {steps: uint8 images}}."""
    ref = reference.astype(np.float32) / 255.0
    return {name: {s: float(np.mean((x.astype(np.float32) / 255.0 - ref) ** 2)) for s, x in row.items()}
            for name, row in samples.items()}


def evaluate(cfg, teacher: LCMPipeline, lcms: dict[str, LCMPipeline], scorer, outdir: str,
             resolution: int, ablation_steps=(1, 2, 4), beyond: Optional[dict] = None,
             beyond_steps=(1, 2, 4), beyond_guidances=()) -> dict:
    """Everything in results.json. ``lcms``: {"LCM": main student, <ablation name>: student, ...};
    ``beyond``: {name: (student, scheduler)} (multistep / data-free LCD, "mlcd" or "lcm"), scored
    over all seeds at ``beyond_steps``, at the table's w and at each of ``beyond_guidances``
    (rows "<name>, w=<w>", where guidance costs less FD).

    ``cfg`` is ``config.table``. The LCM pipelines should come from ``teacher.with_unet`` (one
    compiled-program cache), so each (UNet definition, sampler, steps) compiles once.
    """
    w, per_class, seeds = float(cfg.guidance_scale), int(cfg.per_class), [int(s) for s in cfg.seeds]
    grids = os.path.join(outdir, "grids")
    jobs = [("table", name, teacher, sched, s, w) for name, sched in TEACHER_ROWS.items() for s in cfg.steps]
    jobs += [("table", "LCM", lcms["LCM"], "lcm", s, w) for s in cfg.steps]
    jobs += [("ablation", name, pipe, "lcm", s, w) for name, pipe in lcms.items() if name != "LCM"
             for s in ablation_steps]
    b_ws = [w] + [float(x) for x in beyond_guidances if float(x) != w]
    jobs += [("beyond", name if bw == w else f"{name}, w={bw:g}", pipe, sched, s, bw)
             for bw in b_ws for name, (pipe, sched) in (beyond or {}).items() for s in beyond_steps]
    results: dict[str, Any] = {"guidance_scale": w, "per_class": per_class, "seeds": seeds,
                               "reference_steps": int(cfg.reference_steps),
                               "table": {}, "reference": {}, "floor": {}, "ablation": {}, "beyond": {},
                               "beyond_schedulers": {name: sched for part, name, _, sched, _, _ in jobs
                                                     if part == "beyond"}}
    first: dict[str, dict[str, np.ndarray]] = {"LCM": {}, "DDIM": {}}  # seed 0's images, for trajectory_mse
    for part, name, pipe, sched, s, job_w in tqdm.tqdm(jobs, desc="evaluate"):
        seeds_here = seeds[:1] if part == "ablation" else seeds
        results[part].setdefault(name, {})[str(s)], images = score_sampler(
            pipe, scorer, sched, int(s), job_w, per_class, seeds_here,
            os.path.join(grids, f"{name.replace(' ', '_').replace(',', '')}_{s}steps.png"))
        if (part == "table" and name in first) or (part == "beyond" and job_w == w):
            first.setdefault(name, {})[str(s)] = images
    for ref_w in tqdm.tqdm(cfg.reference_guidances, desc="teacher reference"):
        name = f"DDIM-{cfg.reference_steps} w={ref_w:g}"
        seeds_here = seeds if float(ref_w) == w else seeds[:1]  # the spread matters where the table is
        results["reference"][name], images = score_sampler(teacher, scorer, "ddim", int(cfg.reference_steps), float(ref_w),
                                                   per_class, seeds_here,
                                                   os.path.join(grids, f"DDIM-{cfg.reference_steps}_w{ref_w:g}.png"))
        if float(ref_w) == w:
            results["trajectory"] = trajectory_mse(first, images)
    results["floor"] = floor_rows(teacher, scorer, resolution, per_class)
    return results


def _cell(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def markdown(results: dict) -> str:
    """The tables of results.md (FD: lower is better; accuracy: higher is better)."""
    lines = []
    steps = sorted({int(s) for row in results["table"].values() for s in row})
    head = "| method | " + " | ".join(f"FD {s}-step" for s in steps) + " | " + \
        " | ".join(f"acc {s}-step" for s in steps) + " |"
    rule = "|---" * (1 + 2 * len(steps)) + "|"
    lines += [f"### Table 1 on digits (w = {results['guidance_scale']:g}, {results['per_class']} images per "
              f"class, mean ± std over seeds {results['seeds']})", "", head, rule]
    for name, row in results["table"].items():
        fd = [(_cell(row[str(s)]["fd"], 2) if str(s) in row else "") for s in steps]
        acc = [(_cell(row[str(s)]["acc"], 3) if str(s) in row else "") for s in steps]
        lines.append(f"| {name} | " + " | ".join(fd) + " | " + " | ".join(acc) + " |")
    lines += ["", "### How to read it: floors and the teacher's 50-step quality", "", "| reference | FD | acc |",
              "|---|---|---|"]
    for name, row in {**results["floor"], **results["reference"]}.items():
        lines.append(f"| {name} | {_cell(row['fd'], 2)} | {_cell(row['acc'], 3)} |")
    if results.get("trajectory"):
        t_steps = sorted({int(s) for row in results["trajectory"].values() for s in row})
        lines += ["", f"### Distance to the teacher's DDIM-{results.get('reference_steps', 50)} sample from the same "
                  "noise (MSE in [0, 1] pixels, first seed; lower = closer to the teacher's ODE solution)", "",
                  "| sampler | " + " | ".join(f"{s}-step" for s in t_steps) + " |", "|---" * (1 + len(t_steps)) + "|"]
        for name, row in results["trajectory"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[str(s)]:.4f}" if str(s) in row else "" for s in t_steps)
                         + " |")
    if results["ablation"]:
        a_steps = sorted({int(s) for row in results["ablation"].values() for s in row})
        lines += ["", f"### Ablation at a reduced budget ({results.get('ablation_steps_trained', '?')} LCD steps, "
                  "one seed): solver Psi and skipping step k", "",
                  "| run | " + " | ".join(f"FD {s}-step" for s in a_steps) + " | " +
                  " | ".join(f"acc {s}-step" for s in a_steps) + " |", "|---" * (1 + 2 * len(a_steps)) + "|"]
        for name, row in results["ablation"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(row[str(s)]["fd"], 2) for s in a_steps) + " | " +
                         " | ".join(_cell(row[str(s)]["acc"], 3) for s in a_steps) + " |")
    if results.get("beyond"):
        b_steps = sorted({int(s) for row in results["beyond"].values() for s in row})
        scheds = results.get("beyond_schedulers", {})
        lines += ["", f"### Beyond LCM at a reduced budget ({results.get('beyond_steps_trained', '?')} steps each, "
                  f"mean ± std over seeds {results['seeds']}): multistep LCD (S segments, sampler mlcd) and "
                  "data-free LCD (the teacher's own samples)", "",
                  "| run (sampler) | " + " | ".join(f"FD {s}-step" for s in b_steps) + " | " +
                  " | ".join(f"acc {s}-step" for s in b_steps) + " |", "|---" * (1 + 2 * len(b_steps)) + "|"]
        for name, row in results["beyond"].items():
            lines.append(f"| {name} ({scheds.get(name, 'lcm')}) | " +
                         " | ".join(_cell(row[str(s)]["fd"], 2) for s in b_steps) + " | " +
                         " | ".join(_cell(row[str(s)]["acc"], 3) for s in b_steps) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> str:
    """FD vs steps per method (log-x), with the DDIM-50 references as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, row in results["table"].items():
        steps = sorted(int(s) for s in row)
        means = [np.mean(row[str(s)]["fd"]) for s in steps]
        errs = [np.std(row[str(s)]["fd"]) for s in steps]
        ax.errorbar(steps, means, yerr=errs, marker="o", capsize=3, label=name)
    for name, row in results["reference"].items():
        ax.axhline(np.mean(row["fd"]), linestyle=":", linewidth=1, color="gray")
        ax.annotate(name, (ax.get_xlim()[0], np.mean(row["fd"])), fontsize=6, color="gray", va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("Fréchet distance (digit-classifier features)")
    ax.set_title(f"Digits, w = {results['guidance_scale']:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(results: dict, outdir: str) -> None:
    """results.json, results.md (a rerun skips the evaluation when both exist, so each appears
    whole or not at all) and fd_vs_steps.png."""
    with atomic.file(os.path.join(outdir, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    with atomic.file(os.path.join(outdir, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(outdir, "fd_vs_steps.png"))
