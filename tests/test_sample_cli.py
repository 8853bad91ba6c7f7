"""sample.py: one real run by subprocess on a tiny LCM pipeline; bad inputs fail before loading."""
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import sd_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sample", os.path.join(ROOT, "sample.py"))
sample = sys.modules["sample"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)


def _run(*args, env=None):
    # A fresh process: no fake devices needed; compile fast as conftest does in-process, into the
    # tests' compilation cache (not the user's ~/.cache)
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "LCM_JAX_COMPILE_CACHE": jax.config.jax_compilation_cache_dir or "off", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lcm"))
    sd_models.make_sd_pipeline(d, lcm=True)
    return d


@pytest.mark.slow
def test_end_to_end(lcm_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a photo of a dog\n\n   \n")
    out, npz = tmp_path / "new" / "grid.png", tmp_path / "samples.npz"
    r = _run(f"--pretrained={lcm_dir}", "--prompt", "a cat", "--prompts_file", str(tmp_path / "prompts.txt"),
             "--steps", "2", "--num_images", "2", "--batch_size", "3", "--height", "16", "--width", "8",
             "--out", str(out), "--save_npz", str(npz))
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(out) as grid:  # rows = prompts, columns = images per prompt
        assert grid.format == "PNG" and grid.mode == "RGB" and grid.size == (2 * 8, 2 * 16)
        grid = np.asarray(grid)
    data = np.load(npz)
    images, prompts = data["images"], data["prompts"]
    assert images.dtype == np.uint8 and images.shape == (4, 16, 8, 3)
    assert list(prompts) == ["a cat", "a cat", "a photo of a dog", "a photo of a dog"]
    np.testing.assert_array_equal(grid[16:, 8:], images[3])
    assert images.std() > 0 and not np.array_equal(images[0], images[1])


@pytest.mark.slow
def test_a_second_run_compiles_nothing_new(lcm_dir, tmp_path):
    """The persistent compilation cache is on by default: the second identical sample.py run adds no
    entry (every program it needs was compiled by the first), while a new shape does."""
    cache = tmp_path / "cache"
    entries = lambda: sorted(os.listdir(cache))  # noqa: E731
    args = (f"--pretrained={lcm_dir}", "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16",
            "--out", str(tmp_path / "grid.png"))
    env = {"LCM_JAX_COMPILE_CACHE": str(cache)}
    assert _run(*args, env=env).returncode == 0
    first = entries()
    assert first, "the first run wrote no compilation cache entry"
    r = _run(*args, env=env)
    assert r.returncode == 0 and entries() == first, r.stderr[-2000:]
    assert _run(*args[:-2], "--height", "24", "--out", str(tmp_path / "g2.png"), env=env).returncode == 0
    assert len(entries()) > len(first)  # (what counts as an entry: the check can fail)


def test_compile_cache_folder_errors(tmp_path):
    """An unwritable folder named by the flag or the environment is one line, before anything loads."""
    from lcm_jax import compile_cache
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(compile_cache.CompileCacheError, match="--compile_cache=.*cannot be written"):
        compile_cache.enable(str(blocked / "sub"))
    before = jax.config.jax_compilation_cache_dir
    try:
        assert compile_cache.enable("off") is None and jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


class FakePipe:
    """Records calls; image value = seed, so the batch each image came from shows."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, seed, **kw):
        self.calls.append((list(prompts), seed, kw))
        return np.full((len(prompts), 4, 2, 3), seed, np.uint8)


def test_batches_seeds_and_padding():
    pipe = FakePipe()
    args = sample.SampleArgs(pretrained="x", num_images=3, batch_size=4, seed=10, steps=2, scheduler="ddim")
    images, prompts = sample.generate(pipe, ["p", "q"], args)
    assert prompts == ["p"] * 3 + ["q"] * 3 and images.shape == (6, 4, 2, 3)
    assert [c[1] for c in pipe.calls] == [10, 11]  # batch i uses seed + i
    assert pipe.calls[0][0] == ["p", "p", "p", "q"] and pipe.calls[1][0] == ["q", "q", "q", "q"]  # padded
    assert pipe.calls[0][2]["num_inference_steps"] == 2 and pipe.calls[0][2]["scheduler"] == "ddim"
    assert images[:, 0, 0, 0].tolist() == [10, 10, 10, 10, 11, 11]
    from lcm_jax.images import grid
    grid = grid(np.arange(6)[:, None, None, None].repeat(2, 1).repeat(3, 2).astype(np.uint8), 2)
    assert grid.shape == (4, 9, 1) and grid[0, ::3, 0].tolist() == [0, 1, 2] and grid[2, ::3, 0].tolist() == [3, 4, 5]


def _error(lcm_dir, tmp_path, **kw):
    base = dict(pretrained=lcm_dir, prompts=["a cat"], out=str(tmp_path / "g.png"))
    with pytest.raises(sample.SampleError) as e:
        sample.check_args(sample.SampleArgs(**{**base, **kw}))
    return str(e.value)


def test_bad_inputs_are_named(lcm_dir, tmp_path):
    assert sample.check_args(sample.SampleArgs(pretrained=lcm_dir, prompts=["a"], out=str(tmp_path / "a/b/g.png")))
    assert (tmp_path / "a" / "b").is_dir()  # parents are created
    assert "--pretrained is required" in _error(lcm_dir, tmp_path, pretrained=None)
    assert "'/no/such' is not a folder" in _error(lcm_dir, tmp_path, pretrained="/no/such")
    assert "missing unet/" in _error(lcm_dir, tmp_path, pretrained=str(tmp_path))  # not a pipeline folder
    assert "--scheduler='euler'" in _error(lcm_dir, tmp_path, scheduler="euler")
    assert "--steps=0 must be >= 1" in _error(lcm_dir, tmp_path, steps=0)
    assert "--steps=51" in _error(lcm_dir, tmp_path, steps=51)
    assert sample.check_args(sample.SampleArgs(pretrained=lcm_dir, prompts=["a"], steps=51, scheduler="ddim",
                                               out=str(tmp_path / "g.png")))
    assert "--num_images=0" in _error(lcm_dir, tmp_path, num_images=0)
    assert "--dtype='float16'" in _error(lcm_dir, tmp_path, dtype="float16")
    assert "--height=15 must be a positive multiple of 2" in _error(lcm_dir, tmp_path, height=15)
    assert "no prompts" in _error(lcm_dir, tmp_path, prompts=[])
    assert "cannot read --prompts_file" in _error(lcm_dir, tmp_path, prompts=[], prompts_file=str(tmp_path / "none.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no prompts" in _error(lcm_dir, tmp_path, prompts=[], prompts_file=str(tmp_path / "blank.txt"))
    (tmp_path / "file").write_text("")
    assert "cannot create its folder" in _error(lcm_dir, tmp_path, out=str(tmp_path / "file" / "g.png"))
    assert "must end in .png" in _error(lcm_dir, tmp_path, out=str(tmp_path / "g.jpg"))
    (tmp_path / "dir.png").mkdir()
    assert "is a folder" in _error(lcm_dir, tmp_path, out=str(tmp_path / "dir.png"))
    assert "--save_npz" in _error(lcm_dir, tmp_path, save_npz=str(tmp_path / "file" / "s.npz"))


def test_cli_error_exits_nonzero_with_one_line(lcm_dir, tmp_path):
    r = _run(f"--pretrained={lcm_dir}", "--prompt", "a cat", "--scheduler", "euler", "--out", str(tmp_path / "g.png"))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == ("sample.py: error: --scheduler='euler' is not supported: "
                                                 "expected one of lcm, mlcd, ddim, dpm, dpm++")
    assert not (tmp_path / "g.png").exists()


@pytest.fixture
def immutable_png(tmp_path):
    """An existing .png nobody may write, root included (chattr +i); skipped where the file system
    or the user cannot make one (then the condition under test does not exist)."""
    path = tmp_path / "locked.png"
    path.write_bytes(b"keep")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if not made:
        path.chmod(0o444)
    try:
        with open(path, "ab"):
            pytest.skip("cannot make an unwritable file here (chattr +i failed and the user can write 0444)")
    except OSError:
        pass
    yield path
    if made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_outputs_fail_before_loading(lcm_dir, tmp_path, immutable_png):
    """Issue 18, item 6: the exact output files are tried before any model is loaded, so a
    run's images are never lost at the end; an existing file is left as it was."""
    assert "cannot be written" in _error(lcm_dir, tmp_path, out=str(immutable_png))
    assert immutable_png.read_bytes() == b"keep"
    assert "cannot be written" in _error(lcm_dir, tmp_path, out="/sys/grid.png")  # no file can be made there
    assert "--save_npz" in _error(lcm_dir, tmp_path, save_npz="/sys/samples.npz")
    out = tmp_path / "fresh.png"
    assert sample.check_args(sample.SampleArgs(pretrained=lcm_dir, prompts=["a"], out=str(out)))
    assert not out.exists()  # the probe leaves nothing behind


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sd"))
    sd_models.make_sd_pipeline(d)
    return d


def test_guidance_is_checked(lcm_dir, teacher_dir, tmp_path):
    """Issue 18, item 7: non-finite guidance, CFG below 1 (0 is diffusers' "none"), and an LCM's
    negative omega are errors; an LCM's trained range, when its folder records it, is named."""
    assert "guidance_scale=nan: expected a finite number" in _error(lcm_dir, tmp_path, guidance=float("nan"))
    assert "guidance_scale=inf" in _error(teacher_dir, tmp_path, guidance=float("inf"), scheduler="ddim")
    assert "an LCM embeds omega = w - 1, expected w >= 1" in _error(lcm_dir, tmp_path, guidance=-2.0)
    assert "classifier-free guidance needs w >= 1" in _error(teacher_dir, tmp_path, guidance=0.5, scheduler="ddim")
    for w in (0.0, 1.0, 7.5):  # 0 and 1: no guidance
        assert sample.check_args(sample.SampleArgs(pretrained=teacher_dir, prompts=["a"], scheduler="ddim",
                                                   guidance=w, out=str(tmp_path / "g.png")))
    import shutil
    trained = str(tmp_path / "trained")
    shutil.copytree(lcm_dir, trained)
    with open(os.path.join(trained, "training.json"), "w") as f:
        f.write('{"guidance_range": [3.0, 7.0]}')
    assert "trained on w in [3, 7]" in _error(trained, tmp_path, guidance=0.5)


def test_pipeline_guidance_range(lcm_dir, caplog):
    from lcm_jax.pipeline import LCMPipeline, check_guidance
    pipe = LCMPipeline.from_pretrained(lcm_dir)
    assert pipe.guidance_range is None
    with pytest.raises(ValueError, match="expected a finite number"):
        pipe("a cat", guidance_scale=float("nan"))  # before any compile: nothing is cached
    assert not pipe._compiled
    with caplog.at_level("WARNING"):
        check_guidance(9.0, True, (3.0, 7.0))
    assert "outside the range this LCM was trained on, w in [3, 7]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_guidance(5.0, True, (3.0, 7.0))
    assert not caplog.text


def test_loader_errors_are_one_line(lcm_dir, tmp_path):
    """Issue 18, item 10: a truncated weight file is a one-line message and exit 2, not a traceback;
    --verbose gives the traceback back."""
    import shutil
    broken = str(tmp_path / "broken")
    shutil.copytree(lcm_dir, broken)
    weights = os.path.join(broken, "unet", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    r = _run(f"--pretrained={broken}", "--prompt", "a cat", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: error: cannot read safetensors file") and "Traceback" not in r.stderr, r.stderr
    r = _run(f"--pretrained={broken}", "--prompt", "a cat", "--out", str(tmp_path / "g.png"), "--verbose")
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.slow
def test_sampling_over_8_devices_matches_one(lcm_dir, tmp_path):
    """sample.py --mesh=data=8 on 8 (CPU) devices writes the images --mesh=none does; a bad --mesh is one line."""
    args = (f"--pretrained={lcm_dir}", "--prompt", "a cat", "--prompt", "a dog", "--num_images", "2",
            "--batch_size", "3", "--steps", "2", "--height", "16", "--width", "16")
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = {}
    for mesh in ("data=8", "none"):
        npz = tmp_path / f"{mesh}.npz"
        r = _run(*args, f"--mesh={mesh}", "--out", str(tmp_path / f"{mesh}.png"), "--save_npz", str(npz), env=eight)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mesh] = np.load(npz)["images"]
    assert out["none"].shape == (4, 16, 16, 3)
    assert np.abs(out["data=8"].astype(int) - out["none"].astype(int)).max() <= 1  # uint8 rounding of 1e-5
    r = _run(*args, "--mesh=data=3", env=eight)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("sample.py: error: --mesh='data=3'")
