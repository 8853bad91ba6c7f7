"""What a user can lose or get wrong through train.py (issue 18, items 1-4 and 13), each a real
`python train.py` run (tests/training.py) on configs/tiny.py with the session's tiny teacher."""
import os
import shlex
import shutil
import subprocess

import pytest

import training
from lcm_jax.data.sources import DIGIT_WORDS
from lcm_jax.tiny import make_tiny_pipeline

DEVICES = 4


def _run(command, log, expect=0):
    return training.run(command, str(log), DEVICES, expect)


def _last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def _mtime(path) -> float:
    return os.stat(path).st_mtime_ns


@pytest.fixture(scope="module")
def finished(teacher, tmp_path_factory):
    """A run to step 4 (checkpoints 2 and 4, final/): a workdir with something to lose."""
    wd = str(tmp_path_factory.mktemp("finished"))
    _run(training.cmd(wd, teacher), os.path.join(wd, "train.log"))
    assert training.finished_steps(wd) == [2, 4]
    return wd


@pytest.mark.slow
def test_keep_checkpoints_below_1_is_refused_before_any_work(teacher, finished, tmp_path):
    """Item 1: keep_checkpoints=0 once deleted every checkpoint in the workdir (orbax max_to_keep=0)."""
    before = _mtime(os.path.join(finished, "checkpoints", "4"))
    out = _run(training.cmd(finished, teacher, "--config.keep_checkpoints=0", num_steps=6), tmp_path / "log", 2)
    assert _last_line(out) == "train.py: error: config.keep_checkpoints must be >= 1, got 0"
    assert training.finished_steps(finished) == [2, 4] and _mtime(os.path.join(finished, "checkpoints", "4")) == before


@pytest.mark.slow
def test_fewer_steps_than_the_checkpoint_is_an_error(teacher, finished, tmp_path):
    """Item 3: num_steps below the newest checkpoint once exported the later model, labelled with
    the smaller step; now both numbers are named and nothing is written."""
    final = _mtime(os.path.join(finished, "final", "unet", "diffusion_pytorch_model.safetensors"))
    out = _run(training.cmd(finished, teacher, num_steps=2), tmp_path / "log", 2)
    assert _last_line(out).startswith(f"train.py: error: config.num_steps=2, but {finished}/checkpoints already "
                                      "holds step 4: set num_steps >= 4 to continue that run")
    assert "compiled" not in out  # before any compile
    assert training.finished_steps(finished) == [2, 4]
    assert _mtime(os.path.join(finished, "final", "unet", "diffusion_pytorch_model.safetensors")) == final


@pytest.mark.slow
def test_another_teacher_is_refused_a_moved_one_resumes(teacher, finished, tmp_path):
    """Item 4: the checkpoints record the teacher's fingerprint. Another teacher of the same shapes
    (once resumed silently, exporting its VAE and text encoder) is refused; the same files in
    another folder resume."""
    wd = str(tmp_path / "run")
    shutil.copytree(finished, wd)
    other = str(tmp_path / "other_teacher")
    make_tiny_pipeline(other, DIGIT_WORDS, resolution=16, seed=1)
    out = _run(training.cmd(wd, other, num_steps=6), tmp_path / "other.log", 2)
    assert "was trained from another pretrained model: it was " + repr(teacher) in _last_line(out)
    assert training.finished_steps(wd) == [2, 4]
    moved = str(tmp_path / "moved_teacher")
    shutil.copytree(teacher, moved)
    out = _run(training.cmd(wd, moved, num_steps=6), tmp_path / "moved.log")
    assert training.resumed_from(out) == 4 and training.finished_steps(wd)[-1] == 6


@pytest.mark.slow
def test_divergence_keeps_the_last_good_step_and_says_how_to_resume(teacher, tmp_path):
    """Item 2: the learning rate warms up to 1e30 over 3 steps, so step 2 explodes the params and
    step 3's loss is NaN. The checkpoint of step 2 (finite but exploded) is moved aside; step 1,
    the newest state whose successor was finite, survives keep_checkpoints=1; the message gives
    the command to resume, and a resume with a lower learning rate is allowed (and logged)."""
    wd = str(tmp_path / "run")
    args = ["--config.keep_checkpoints=1", "--config.learning_rate=1e30", "--config.warmup_steps=3"]
    command = training.cmd(wd, teacher, *args, num_steps=4, checkpoint_every=1)
    out = _run(command, tmp_path / "diverged.log", 2)
    lines = out.strip().splitlines()
    assert lines[-2].startswith("train.py: error: non-finite loss or gradient at step 3"), out[-3000:]
    assert (f"the checkpoint of step 2, whose state produced it, was moved to {wd}/checkpoints_nonfinite/2; "
            "the newest good checkpoint is step 1") in lines[-2]
    assert training.finished_steps(wd) == [1]
    assert os.listdir(os.path.join(wd, "checkpoints_nonfinite")) == ["2"]  # kept, not deleted
    prefix = "to resume from step 1 with a 10x lower learning rate: "
    assert lines[-1].startswith(prefix)
    printed = shlex.split(lines[-1][len(prefix):])
    expected = [a for a in command[1:] if not a.startswith("--config.learning_rate")] + ["--config.learning_rate=1e+29"]
    assert printed == ["python"] + expected
    # that command, with a learning rate that does not diverge, resumes from step 1
    resume = [command[0]] + printed[1:-1] + ["--config.learning_rate=1e-3"]
    out = _run(resume, tmp_path / "resumed.log")
    assert training.resumed_from(out) == 1
    assert "resuming step 1 with a changed optimizer setting: learning_rate: checkpoint=1e+30, now=0.001" in out
    assert training.finished_steps(wd) == [4] and os.path.isdir(os.path.join(wd, "final", "unet"))


@pytest.fixture
def small_disk(tmp_path):
    """A workdir whose checkpoints/ is a 24 MB tmpfs (a checkpoint of the tiny run is ~17 MB): the
    first checkpoint fits, the second fills the disk. Needs root (mount), as CI has."""
    wd = tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(wd / "checkpoints")],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield str(wd)
    subprocess.run(["umount", "-l", str(wd / "checkpoints")], check=True)


@pytest.mark.slow
def test_disk_full_is_one_line_naming_the_intact_step(teacher, small_disk, tmp_path):
    """Item 13: a full disk during a checkpoint write once printed 1,474 lines of orbax/asyncio
    tracebacks. Now the write is refused before it starts (it needs what the last step took):
    one line naming what failed and the newest intact step, exit 2."""
    out = _run(training.cmd(small_disk, teacher, num_steps=4, checkpoint_every=2), tmp_path / "full.log", 2)
    last = _last_line(out)
    assert last.startswith(f"train.py: error: not enough space to write checkpoint step 4 to {small_disk}/checkpoints: "
                           "it needs about "), out[-3000:]
    assert "the newest intact checkpoint is step 2; free the space and rerun the same command to resume" in last
    assert "Traceback" not in out and len(out.splitlines()) < 20
    assert training.finished_steps(small_disk) == [2]
