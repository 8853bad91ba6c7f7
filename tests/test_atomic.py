"""Stage outputs appear whole or not at all (lcm_jax.atomic): an interrupted write leaves PATH
absent and PATH.partial for inspection, the error propagates, and the rerun removes the partial
and writes PATH again; the real stage writers (the tiny teacher, the digit scorer) crash and rerun."""
import logging
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lcm_jax import atomic  # noqa: E402


class Crash(Exception):
    pass


def write(folder, files):
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def tree(folder):
    return {os.path.relpath(os.path.join(r, n), folder): open(os.path.join(r, n)).read()
            for r, _, files in os.walk(folder) for n in files}


# ---------------------------------------------------------------------- the context managers
def test_folder_crash_leaves_no_output_and_the_rerun_redoes_it(tmp_path, caplog):
    out = str(tmp_path / "stage")
    with pytest.raises(Crash, match="mid-write"):  # propagated, not swallowed
        with atomic.folder(out) as tmp:
            assert tmp == out + ".partial" and os.path.isdir(tmp) and not os.path.exists(out)
            write(tmp, {"model_index.json": "{}", "unet/weights": "half"})
            raise Crash("mid-write")
    assert not os.path.exists(out)  # so a rerun's "skip if it exists" check redoes the stage
    assert tree(out + ".partial") == {"model_index.json": "{}", "unet/weights": "half"}  # kept for inspection
    with caplog.at_level(logging.WARNING):
        with atomic.folder(out) as tmp:
            assert os.listdir(tmp) == []  # the crash's files are gone
            write(tmp, {"model_index.json": "{}", "unet/weights": "whole"})
            assert not os.path.exists(out)  # not before the block ends
    assert tree(out) == {"model_index.json": "{}", "unet/weights": "whole"}
    assert not os.path.exists(out + ".partial")
    assert f"removing {out}.partial: left incomplete by an interrupted run" in caplog.text


def test_folder_refuses_an_existing_output(tmp_path):
    out = str(tmp_path / "stage")
    write(out, {"mine": "not the stage's"})
    with pytest.raises(FileExistsError, match="exists but is not this stage's complete output"):
        with atomic.folder(out):
            pytest.fail("entered the block")
    assert tree(out) == {"mine": "not the stage's"} and not os.path.exists(out + ".partial")
    os.makedirs(tmp_path / "empty")  # an empty folder (pytest's tmp dirs) is written into
    with atomic.folder(str(tmp_path / "empty")) as tmp:
        write(tmp, {"a": "1"})
    assert tree(str(tmp_path / "empty")) == {"a": "1"}


def test_folder_that_appears_meanwhile_is_kept_and_so_is_the_new_one(tmp_path):
    out = str(tmp_path / "stage")
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with atomic.folder(out) as tmp:
            write(tmp, {"a": "new"})
            write(out, {"a": "other writer"})
    assert tree(out) == {"a": "other writer"} and tree(out + ".partial") == {"a": "new"}


def test_folder_overwrite_replaces_only_when_complete(tmp_path):
    out = str(tmp_path / "stage")
    write(out, {"a": "old"})
    with pytest.raises(Crash):
        with atomic.folder(out, overwrite=True) as tmp:
            write(tmp, {"a": "new"})
            raise Crash()
    assert tree(out) == {"a": "old"}
    with atomic.folder(out, overwrite=True) as tmp:
        write(tmp, {"b": "new"})
        assert tree(out) == {"a": "old"}
    assert tree(out) == {"b": "new"} and not os.path.exists(out + ".old") and not os.path.exists(out + ".partial")


def test_file_crash_keeps_the_old_file(tmp_path, caplog):
    path = str(tmp_path / "sub" / "results.json")
    with pytest.raises(KeyboardInterrupt):  # a signal too
        with atomic.file(path) as tmp, open(tmp, "w") as f:
            f.write('{"half": ')
            raise KeyboardInterrupt
    assert not os.path.exists(path) and open(path + ".partial").read() == '{"half": '
    with caplog.at_level(logging.WARNING):
        with atomic.file(path) as tmp, open(tmp, "w") as f:
            f.write("1")
    assert open(path).read() == "1" and not os.path.exists(path + ".partial") and "removing" in caplog.text
    with pytest.raises(Crash):
        with atomic.file(path) as tmp, open(tmp, "w") as f:
            f.write("2")
            raise Crash()
    assert open(path).read() == "1"
    with atomic.file(path) as tmp, open(tmp, "w") as f:
        f.write("2")
    assert open(path).read() == "2"
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic.file(path):
            pass
    assert open(path).read() == "2"


# ---------------------------------------------------------------------- real stages, crashed mid-write
@pytest.fixture
def truncate_first_safetensors(monkeypatch):
    """The first safetensors file written is cut to half its bytes and the write raises: a crash
    (disk full, kill) mid-way through a stage's output. Later writes are untouched."""
    import safetensors.numpy
    real = safetensors.numpy.save_file
    calls = []

    def crash_once(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if calls:
            return
        calls.append(filename)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:
            f.truncate(size // 2)
        raise OSError(f"injected crash: {filename} cut to {size // 2} of {size} bytes")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash_once)
    return calls


def test_crashed_tiny_teacher_is_redone_not_trusted(tmp_path, truncate_first_safetensors):
    """trainer.train makes WORKDIR/teacher with make_tiny_pipeline unless WORKDIR/teacher/unet is there."""
    from lcm_jax.data.sources import DIGIT_WORDS
    from lcm_jax.pipeline import LCMPipeline
    from lcm_jax.tiny import make_tiny_pipeline
    out = str(tmp_path / "teacher")
    with pytest.raises(OSError, match="injected crash"):
        make_tiny_pipeline(out, DIGIT_WORDS, resolution=16, seed=0)
    assert "unet" in truncate_first_safetensors[0]
    assert not os.path.exists(out) and not os.path.isdir(os.path.join(out, "unet"))  # the rerun's check
    assert os.path.isdir(out + ".partial")
    made = make_tiny_pipeline(out, DIGIT_WORDS, resolution=16, seed=0)  # the rerun
    loaded = LCMPipeline.from_pretrained(out)
    np.testing.assert_array_equal(loaded.unet_params["conv_in"]["kernel"], made.unet_params["conv_in"]["kernel"])
    assert not os.path.exists(out + ".partial")


def test_crashed_scorer_is_retrained_not_trusted(tmp_path, truncate_first_safetensors):
    """digits.run / the in-loop evaluator load WORKDIR/scorer.safetensors if it is a file, else train it."""
    from lcm_jax.digits.classifier import DigitScorer
    from lcm_jax.digits.evaluator import load_or_train_scorer
    path = str(tmp_path / "scorer.safetensors")
    with pytest.raises(OSError, match="injected crash"):
        load_or_train_scorer(path, 8, steps=2)
    assert not os.path.isfile(path)  # so the rerun trains it again instead of failing to load it
    trained = load_or_train_scorer(path, 8, steps=2)  # the rerun
    np.testing.assert_array_equal(DigitScorer.load(path, 8).ref_sigma, trained.ref_sigma)
    assert not os.path.exists(path + ".partial")


def test_teacher_stage_refuses_a_foreign_folder_before_training(tmp_path, monkeypatch):
    """A WORKDIR/teacher without model_index.json (not a complete teacher) is named before any training."""
    from configs import digits
    from lcm_jax.digits import teacher
    monkeypatch.setattr(teacher, "load_source", lambda *a, **k: pytest.fail("started training"))
    write(str(tmp_path / "teacher"), {"unet/diffusion_pytorch_model.safetensors": "half"})
    with pytest.raises(FileExistsError, match="teacher' exists but is not this stage's complete output"):
        teacher.train_teacher(digits.get_config(), str(tmp_path))
