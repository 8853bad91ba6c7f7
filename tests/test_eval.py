"""Evaluator for the digits reproduction: Fréchet distance and the digit classifier scorer."""
import json

import jax
import numpy as np
import pytest
import scipy.linalg

from lcm_jax.data.sources import load_digits
from lcm_jax.digits.classifier import DigitScorer, train_classifier
from lcm_jax.eval import fd_between, frechet_distance, gaussian_stats

R = 16


# ---------------------------------------------------------------- Fréchet distance (numpy)

def _random_features(seed, n=500, d=16, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ mix  # [N, D], correlated


def test_fd_identical_is_zero_and_symmetric():
    a, b = _random_features(0), _random_features(1, scale=1.5, shift=0.3)
    assert abs(fd_between(a, a)) < 1e-6 * np.trace(gaussian_stats(a)[1])
    assert fd_between(a, b) > 0.1
    np.testing.assert_allclose(fd_between(a, b), fd_between(b, a), rtol=1e-9)


def test_fd_matches_closed_form_and_scipy():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.0]), np.array([4.0, 1.0, 9.0])  # one singular covariance
    want = 1.0 + 4.0 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), want, rtol=1e-9)
    # A general well-conditioned pair agrees with the textbook scipy.linalg.sqrtm form.
    (m1, s1), (m2, s2) = gaussian_stats(_random_features(2)), gaussian_stats(_random_features(3, scale=2.0))
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2), ref, rtol=1e-6)


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- classifier scorer

@pytest.fixture(scope="module")
def scorer():
    return DigitScorer.create(R, seed=0)


@pytest.fixture(scope="module")
def real():
    images, _, labels = load_digits(R, "train")  # the generator's data; the classifier never saw it
    return images, labels


def _noised(images, std, seed=0):
    noise = np.random.default_rng(seed).normal(0.0, std, images.shape[:-1] + (1,))
    return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)  # [N, R, R, 3]


def test_classifier_accuracy_on_unseen_digits(scorer, real):
    images, labels = real
    out = scorer.score(images, labels)
    assert out["accuracy"] >= 0.95, out
    assert abs(out["fd"]) < 1e-6, out  # the reference set itself
    assert scorer.score(images, (labels + 1) % 10)["accuracy"] < 0.05


def test_fd_grows_with_noise_and_real_halves_are_close(scorer, real):
    images, labels = real
    feats = scorer.features(images)  # [N, 64]
    assert feats.shape == (len(images), 64)
    fds = [scorer.score(_noised(images, std), labels)["fd"] for std in (16.0, 32.0, 64.0)]
    assert fds[0] < fds[1] < fds[2], fds
    halves = fd_between(feats[0::2], feats[1::2])  # interleaved: same writers, different examples
    assert halves < fds[1] and 4 * halves < fds[2], (halves, fds)


def test_save_load_round_trip(scorer, real, tmp_path):
    images, labels = real[0][:300], real[1][:300]
    path = str(tmp_path / "scorer.safetensors")
    scorer.save(path)
    back = DigitScorer.load(path, resolution=R)
    assert back.resolution == R
    assert back.score(images, labels) == scorer.score(images, labels)
    with pytest.raises(ValueError, match="expected 8x8"):
        DigitScorer.load(path, resolution=8)


def test_load_bad_files_raise(tmp_path):
    from safetensors.numpy import save_file
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="nope.safetensors.*does not exist"):
        DigitScorer.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="cannot read digit scorer file"):
        DigitScorer.load(str(garbage))
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, foreign)
    with pytest.raises(ValueError, match="expected a lcm_jax.eval.DigitScorer"):
        DigitScorer.load(foreign)
    meta = {"lcm_jax": json.dumps({"format": "lcm_jax.eval.DigitScorer", "version": 1, "resolution": R})}
    save_file({"ref_mu": np.zeros(64)}, foreign, metadata=meta)  # ours by metadata, tensors missing
    with pytest.raises(ValueError, match="does not match a 16x16 DigitScorer.*params/Dense_0/kernel"):
        DigitScorer.load(foreign)


def test_score_rejects_wrong_images(scorer):
    with pytest.raises(ValueError, match="expected 16x16"):
        scorer.score(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4))
    with pytest.raises(ValueError, match=r"\[N, R, R, 3\]"):
        scorer.features(np.zeros((4, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        scorer.features(np.zeros((4, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="expected labels"):
        scorer.score(np.zeros((4, 16, 16, 3), np.uint8), np.zeros(3))


def test_training_is_deterministic_in_seed():
    images, _, labels = load_digits(R, "heldout")
    a, b, c = (train_classifier(images, labels, steps=3, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(c)[0])
