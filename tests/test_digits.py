"""The digits reproduction (configs/digits.py): every stage end to end at smoke size."""
import json
import os

import numpy as np
import pytest

from configs.digits import get_config
from lcm_jax.digits import run as digits
from lcm_jax.digits import table


def test_ablation_runs_cover_solvers_and_k_once():
    c = get_config()
    runs = digits.ablation_configs(c, "/teacher", "/scorer")
    assert list(runs) == ["solver=ddim k=20", "solver=dpm k=20", "solver=dpm++ k=20",
                          "solver=ddim k=1", "solver=ddim k=5"]
    assert runs["solver=ddim k=1"].lcd.num_ddim_timesteps == 1000
    assert runs["solver=dpm++ k=20"].lcd.solver == "dpm++"
    assert all(r.num_steps == c.ablation.num_steps and r.pretrained == "/teacher" and r.eval_every == 0
               for r in runs.values())
    assert c.pretrained == "" and c.num_steps == get_config().num_steps != c.ablation.num_steps  # untouched


def test_beyond_runs_are_options_of_the_same_lcd_run():
    c = get_config()
    runs = digits.beyond_configs(c, "/teacher", "/scorer")
    assert list(runs) == ["MLCD S=2", "MLCD S=4", "data-free LCD"]
    assert [runs[f"MLCD S={s}"].lcd.num_segments for s in (2, 4)] == [2, 4]
    assert all(runs[n].lcd.target == "online" and runs[n].sample_scheduler == "mlcd" for n in ("MLCD S=2", "MLCD S=4"))
    free = runs["data-free LCD"]
    assert free.data.source == "teacher" and free.lcd.num_segments == 1 and free.sample_scheduler == "lcm"
    assert list(free.data.prompts) == [f"a handwritten digit {w}" for w in
                                       ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    assert all(r.num_steps == c.beyond.num_steps == c.ablation.num_steps and r.eval_every == 0 for r in runs.values())


def test_markdown_layout():
    cell = {"fd": [1.0, 3.0], "acc": [0.5, 0.7]}
    results = {"guidance_scale": 9.0, "per_class": 4, "seeds": [0, 1],
               "table": {"DDIM": {"1": cell, "2": cell}, "LCM": {"1": cell, "2": cell}},
               "reference": {"DDIM-50 w=9": cell}, "floor": {"real": {"fd": [0.5], "acc": [1.0]}},
               "ablation": {"solver=ddim k=20": {"1": {"fd": [2.0], "acc": [0.9]}}}, "ablation_steps_trained": 10,
               "trajectory": {"LCM": {"1": 0.01, "2": 0.02}, "DDIM": {"1": 0.3, "2": 0.0}}}
    md = table.markdown(results)
    assert "| LCM | 0.0100 | 0.0200 |" in md and "| DDIM | 0.3000 | 0.0000 |" in md
    assert "| method | FD 1-step | FD 2-step | acc 1-step | acc 2-step |" in md
    assert "| LCM | 2.00 ± 1.00 | 2.00 ± 1.00 | 0.600 ± 0.100 | 0.600 ± 0.100 |" in md
    assert "| real | 0.50 | 1.000 |" in md and "| solver=ddim k=20 | 2.00 | 0.900 |" in md
    results.update(beyond={"MLCD S=2": {"1": cell}}, beyond_schedulers={"MLCD S=2": "mlcd"}, beyond_steps_trained=10)
    assert "| MLCD S=2 (mlcd) | 2.00 ± 1.00 | 0.600 ± 0.100 |" in table.markdown(results)


@pytest.mark.slow
def test_smoke_run_every_stage(tmp_path):
    """Teacher -> LCD -> ablations -> evaluation at smoke size; a rerun skips every stage."""
    workdir = str(tmp_path / "digits")
    config = get_config("smoke")
    out = digits.run(config, workdir)
    assert out == os.path.join(workdir, "results.md")
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert set(results["table"]) == {"DDIM", "DPM-Solver", "DPM-Solver++", "LCM"}
    for row in results["table"].values():
        assert set(row) == {"1", "2"} and all(len(c["fd"]) == 2 for c in row.values())
        assert all(np.isfinite(c["fd"]).all() and 0 <= min(c["acc"]) <= max(c["acc"]) <= 1 for c in row.values())
    assert set(results["ablation"]) == {"solver=dpm++ k=20"}
    assert set(results["beyond"]) == {"MLCD S=2"}  # no LCD row: the smoke ablation has no ddim run
    assert all(len(c["fd"]) == 2 for row in results["beyond"].values() for c in row.values())
    assert set(results["reference"]) == {"DDIM-2 w=9"}
    assert len(results["floor"]) == 2
    # same seed, same noise: the teacher's DDIM-2 is its own reference here, so exactly 0
    assert results["trajectory"]["DDIM"]["2"] == 0.0 and results["trajectory"]["LCM"]["1"] > 0.0
    for name in ("teacher", "final", "results.md", "fd_vs_steps.png", "grids/LCM_1steps.png",
                 "grids/DDIM_2steps.png", "scorer.safetensors", "ablations/solverdpm++_k20/final",
                 "beyond/MLCD_S2/final", "grids/MLCD_S=2_2steps.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "steps_per_s" in open(os.path.join(workdir, "metrics.jsonl")).read()
    assert "eval/fd_1" in open(os.path.join(workdir, "metrics.jsonl")).read()  # the in-loop evaluation

    # diffusers' own pipeline loads and runs the teacher folder
    import torch
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(workdir, "teacher"), safety_checker=None)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    image = pipe("a handwritten digit seven", num_inference_steps=2, guidance_scale=9.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    # a rerun finds every output and redoes nothing
    mtime = os.path.getmtime(os.path.join(workdir, "final", "model_index.json"))
    assert digits.run(config, workdir) == out
    assert os.path.getmtime(os.path.join(workdir, "final", "model_index.json")) == mtime
    assert json.load(open(os.path.join(workdir, "results.json")))["table"] == results["table"]
