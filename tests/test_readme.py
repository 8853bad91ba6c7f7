"""The README shows only what exists (issue 18, items 15-16): every Python block runs, every
`python sample.py` command runs, and every `python train.py` / cache command's config loads and
passes the trainer's validation, with the README's paths replaced by tiny models made here."""
import os
import re
import shlex
import subprocess
import sys

import pytest

import sd_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    README = f.read()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README, flags=re.S | re.M)


def commands() -> list[list[str]]:
    """Each `python ...` command of the bash blocks as argv (continuations joined, comments
    dropped), including those inside another command (srun, gcloud --command="...")."""
    out = []

    def scan(text: str) -> None:
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            parts, cur = [], []
            for w in words + ["&&"]:  # "a && b" -> [a], [b]
                if w in ("&&", ";"):
                    parts.append(cur)
                    cur = []
                else:
                    cur.append(w)
            for argv in parts:
                for i, tok in enumerate(argv):
                    if tok in ("python", "python3"):
                        rest = argv[i + 1:]  # a script, or our module CLI (not pip / pytest)
                        if rest and (rest[0].endswith(".py") or rest[:2] == ["-m", "lcm_jax.data.cache"]):
                            out.append(rest)
                        break
                    if "python " in tok:  # a command held in a flag's value
                        scan(tok.split("=", 1)[-1])
    for b in blocks("bash"):
        scan(b)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread):
    """Tiny stand-ins for the README's folders: an SD teacher, an LCM, an SDXL teacher, a LoRA."""
    root = tmp_path_factory.mktemp("readme_models")
    sd, lcm, sdxl = str(root / "sd"), str(root / "lcm"), str(root / "sdxl")
    sd_models.make_sd_pipeline(sd)
    sd_models.make_sd_pipeline(lcm, lcm=True)
    sd_models.make_sdxl_pipeline(sdxl)
    import jax
    from lcm_jax import lora, lora_files
    from lcm_jax.pipeline import LCMPipeline
    params = LCMPipeline.from_pretrained(sd).unet_params
    lora_dir = str(root / "lcm_lora")
    lora_files.save_lora_weights(lora_dir, lora.init_lora(params, 4, rng=jax.random.PRNGKey(0)), alpha=4.0)
    return {"sd": sd, "lcm": lcm, "sdxl": sdxl, "lora": lora_dir}


def stand_in(value: str, models: dict) -> str:
    """The tiny folder for a README path: an exported LCM (``.../final``), an SDXL or an SD model."""
    if value.endswith("/final"):
        return models["lcm"]
    if "lcm-lora" in value:
        return models["lora"]
    return models["sdxl"] if "sdxl" in value else models["sd"]


def test_the_package_exports_the_public_names():
    import lcm_jax
    from lcm_jax import LCMPipeline, UserError, train  # noqa: F401  (the README's first line, and more)
    for name in lcm_jax.__all__:
        assert getattr(lcm_jax, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lcm_jax.nothing  # noqa: B018
    assert os.path.isfile(os.path.join(ROOT, "ARCHITECTURE.md"))
    assert "DESIGN.md" not in README  # the architecture note the repository carries is its own


def test_python_blocks_run(models, tmp_path, monkeypatch):
    code = blocks("python")
    assert code, "the README has no Python block"
    monkeypatch.chdir(tmp_path)  # "out", "out_lora" are written here
    for block in code:
        paths = set(re.findall(r'"((?:runs|/path/to)/[^"]+)"', block))
        for p in paths:
            block = block.replace(f'"{p}"', repr(stand_in(p, models)))
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "out" / "unet").is_dir() and (tmp_path / "out_lora").is_dir()


def _config_args(argv: list[str], models: dict, tmp_path) -> list[str]:
    """The --config flags of a train.py / cache command, their paths replaced by tiny stand-ins."""
    out = []
    for a in argv:
        if not a.startswith("--config"):
            continue
        key, _, value = a.partition("=")
        if key == "--config.pretrained":
            value = stand_in(value, models)
        elif key in ("--config.data.path", "--config.eval.clip_model"):  # validation checks the folder exists
            value = str(tmp_path / "folder")
            os.makedirs(value, exist_ok=True)
        elif key == "--config.data.prompts":
            value = str(tmp_path / "prompts.txt")
            with open(value, "w") as f:
                f.write("a photo of a cat\n")
        out.append(f"{key}={value}")
    return out


def test_train_commands_have_valid_configs(models, tmp_path, monkeypatch):
    from absl import flags
    from ml_collections import config_flags
    from lcm_jax import trainer
    monkeypatch.chdir(ROOT)
    train = [c for c in commands() if c[0] == "train.py" or c[:2] == ["-m", "lcm_jax.data.cache"]]
    assert len(train) >= 10, train
    checked = 0
    for argv in train:
        args = _config_args(argv, models, tmp_path)
        if any(a.startswith("--config=configs/digits.py") for a in args):
            continue  # the main job: test_digits runs its smoke variant end to end
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                        sys_argv=["train.py", *args])  # (it reads the overrides from here)
        fv(["train.py", *args])
        trainer.validate_config(fv.config)
        checked += 1
    assert checked >= 10


@pytest.mark.slow
def test_sample_commands_run(models, tmp_path):
    import jax
    runs = [c for c in commands() if c[0] == "sample.py"]
    assert len(runs) >= 2, runs
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "LCM_JAX_COMPILE_CACHE": jax.config.jax_compilation_cache_dir or "off"}  # not ~/.cache
    env.pop("XLA_FLAGS", None)
    for i, argv in enumerate(runs):
        out = str(tmp_path / f"grid{i}.png")
        args = [f"--pretrained={stand_in(a.split('=', 1)[1], models)}" if a.startswith("--pretrained=") else a
                for a in argv[1:]]
        if "--out" in args:
            args[args.index("--out") + 1] = out
        else:
            args += ["--out", out]
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{argv}:\n{r.stderr[-3000:]}"
        assert os.path.getsize(out) > 0
