"""sample.py: one real run by subprocess on a tiny LCM pipeline; bad inputs fail before loading."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sd_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sample", os.path.join(ROOT, "sample.py"))
sample = sys.modules["sample"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)


def _run(*args):
    # A fresh process: no fake devices needed; compile fast as conftest does in-process.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lcm"))
    sd_models.make_sd_pipeline(d, lcm=True)
    return d


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
    grid = sample.make_grid(np.arange(6)[:, None, None, None].repeat(2, 1).repeat(3, 2).astype(np.uint8), 2, 3)
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
