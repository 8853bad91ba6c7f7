"""A small digit classifier and the scorer built on it: the digits reproduction's FID / CLIP-score analogues.

FD is measured on the classifier's penultimate features (as FID uses Inception's pool features);
accuracy on the prompted class stands in for CLIP score. The classifier trains on the digits
"heldout" split, which the generator never sees; reference statistics come from "train".
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lcm_jax import atomic
from lcm_jax.eval.fd import frechet_distance, gaussian_stats

FORMAT = "lcm_jax.eval.DigitScorer"
FORMAT_VERSION = 1
FEATURE_DIM = 64
Params = Any


class DigitClassifier(nn.Module):
    """Three 3x3 convs (two strided) -> dense feature layer -> ReLU -> 10-way head."""
    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = FEATURE_DIM
    num_classes: int = 10

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        # images: [N, R, R, C] on the 0..255 scale (uint8 or float); grayscale in [-1, 1] inside.
        x = images.astype(jnp.float32).mean(axis=-1, keepdims=True) / 127.5 - 1.0  # [N, R, R, 1]
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(c, (3, 3), strides=(1, 1) if i == 0 else (2, 2))(x))
        x = x.reshape(x.shape[0], -1)  # [N, R/4 * R/4 * C]
        features = nn.Dense(self.feature_dim)(x)  # [N, D], pre-activation: no dead units for FD
        return nn.Dense(self.num_classes)(nn.relu(features)), features  # [N, 10], [N, D]


def _check_images(images: np.ndarray, resolution: int | None = None) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected images [N, R, R, 3] (uint8 0..255), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (0..255, as the pipeline returns), got {images.dtype}")
    if resolution is not None and images.shape[1] != resolution:
        raise ValueError(f"expected {resolution}x{resolution} images, got {images.shape[1]}x{images.shape[2]}")
    return images


def _augment(rng: np.random.Generator, images: np.ndarray, shift: int, noise: float) -> np.ndarray:
    """Random translations of up to ``shift`` px (zero = background fill) plus Gaussian noise; float32.

    Done on the host with numpy: cheap at this size, and keeps the jitted step free of PRNG code.
    """
    n, r = images.shape[:2]
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))  # [N, R+2s, R+2s, 3]
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n, 1, 1))
    rows, cols = dy + np.arange(r)[None, :, None], dx + np.arange(r)[None, None, :]  # [N, R, 1], [N, 1, R]
    x = padded[np.arange(n)[:, None, None], rows, cols].astype(np.float32)  # [N, R, R, 3]
    x += np.float32(noise * 255.0) * rng.standard_normal(x.shape[:-1] + (1,), dtype=np.float32)
    return np.clip(x, 0.0, 255.0)


def _param_shapes(resolution: int) -> Params:
    return jax.eval_shape(DigitClassifier().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, resolution, resolution, 3), jnp.float32))["params"]


def init_params(rng: np.random.Generator, resolution: int) -> Params:
    """He-normal kernels, zero biases, drawn with numpy: XLA's threefry init compiles for ~15 s on CPU."""
    def init(path, leaf):
        if path[-1] == "bias":
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    flat = traverse_util.flatten_dict(_param_shapes(resolution))
    return traverse_util.unflatten_dict({k: init(k, v) for k, v in flat.items()})


_ADAM = optax.scale_by_adam()


@jax.jit
def _train_step(params: Params, opt_state: Any, x: jax.Array, y: jax.Array, lr: jax.Array) -> tuple[Params, Any]:
    """One Adam step on cross-entropy; x: [B, R, R, 3] float 0..255, y: [B]. lr is traced (one compile)."""
    def loss_fn(params):
        logits, _ = DigitClassifier().apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, opt_state = _ADAM.update(jax.grad(loss_fn)(params), opt_state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 600, batch_size: int = 32,
                     learning_rate: float = 3e-3, shift: int = 1, noise: float = 0.05, seed: int = 0) -> Params:
    """Train ``DigitClassifier`` on uint8 [N, R, R, 3] images and int labels [N]; returns params.

    Adam with cosine decay to 0, random ±``shift`` px translations and Gaussian noise (std ``noise``
    of the 0..255 range) so 360 examples generalise; deterministic in ``seed``.
    """
    images = _check_images(images)
    labels = np.asarray(labels, np.int32)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"expected labels [{images.shape[0]}], got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    params = init_params(rng, images.shape[1])
    opt_state = _ADAM.init(params)
    lrs = np.float32(learning_rate) * 0.5 * (1 + np.cos(np.pi * np.arange(steps, dtype=np.float32) / steps))
    for lr in lrs:
        idx = rng.integers(0, images.shape[0], batch_size)
        x = _augment(rng, images[idx], shift, noise)
        params, opt_state = _train_step(params, opt_state, x, labels[idx], lr)
    return jax.device_get(params)


@jax.jit
def _apply(params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return DigitClassifier().apply({"params": params}, images)


def classify(params: Params, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, 10], features [N, D]) of uint8 images [N, R, R, 3], in fixed-size batches."""
    images = _check_images(images)
    n = images.shape[0]
    logits, feats = [], []
    for i in range(0, n, batch_size):
        chunk = images[i:i + batch_size]
        pad = batch_size - chunk.shape[0]  # pad the last batch so one shape compiles once
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
        lo, fe = _apply(params, jnp.asarray(chunk))
        logits.append(np.asarray(lo)[:batch_size - pad])
        feats.append(np.asarray(fe)[:batch_size - pad])
    if not logits:
        return np.zeros((0, 10), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


@dataclasses.dataclass
class DigitScorer:
    """Classifier params plus Gaussian stats of real digit features ("train" split) at ``resolution``."""
    resolution: int
    params: Params
    ref_mu: np.ndarray  # [D]
    ref_sigma: np.ndarray  # [D, D]

    @classmethod
    def create(cls, resolution: int, seed: int = 0, steps: int = 600) -> "DigitScorer":
        """Train the classifier on the digits "heldout" split; reference stats from "train"."""
        from lcm_jax.data.sources import load_digits
        images, _, labels = load_digits(resolution, "heldout")
        params = train_classifier(images, labels, steps=steps, seed=seed)
        real, _, _ = load_digits(resolution, "train")
        mu, sigma = gaussian_stats(classify(params, real)[1])
        return cls(resolution, params, mu, sigma)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate classifier features [N, D] of uint8 images [N, R, R, 3]."""
        return classify(self.params, _check_images(images, self.resolution))[1]

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """FD of ``images`` vs real digits, and classifier accuracy on the prompted ``labels`` [N].

        FD is biased upward for small N; compare runs at equal N (a few hundred or more).
        """
        logits, feats = classify(self.params, _check_images(images, self.resolution))
        labels = np.asarray(labels)
        if labels.shape != (feats.shape[0],):
            raise ValueError(f"expected labels [{feats.shape[0]}], got shape {labels.shape}")
        fd = frechet_distance(*gaussian_stats(feats), self.ref_mu, self.ref_sigma)
        return {"fd": fd, "accuracy": float(np.mean(logits.argmax(-1) == labels))}

    def save(self, path: str) -> None:
        """One safetensors file: params under 'params/...', 'ref_mu', 'ref_sigma', JSON metadata.
        Written whole or not at all (atomic.file): a rerun trains a missing scorer, but trusts one that is there."""
        from safetensors.numpy import save_file
        flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
        tensors = {f"params/{k}": np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
        tensors["ref_mu"] = np.ascontiguousarray(self.ref_mu, np.float64)
        tensors["ref_sigma"] = np.ascontiguousarray(self.ref_sigma, np.float64)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "resolution": self.resolution,
                "feature_dim": FEATURE_DIM}
        with atomic.file(path) as tmp:
            save_file(tensors, tmp, metadata={"lcm_jax": json.dumps(meta)})

    @classmethod
    def load(cls, path: str, resolution: int | None = None) -> "DigitScorer":
        """Read what ``save`` wrote; ValueError if it is missing, not ours, or the wrong resolution/shapes."""
        from safetensors import safe_open
        want = f"a {FORMAT} safetensors file (from DigitScorer.save)"
        if not os.path.isfile(path):
            raise ValueError(f"digit scorer file {path!r} does not exist: expected {want}")
        try:
            with safe_open(path, framework="numpy") as f:
                meta_raw = (f.metadata() or {}).get("lcm_jax")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # name the file; keep the cause
            raise ValueError(f"cannot read digit scorer file {path!r}: expected {want} ({e})") from e
        try:
            meta = json.loads(meta_raw)
            ok = meta["format"] == FORMAT and meta["version"] == FORMAT_VERSION
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"{path!r} has metadata {meta_raw!r}: expected {want}, version {FORMAT_VERSION}")
        res = int(meta["resolution"])
        if resolution is not None and res != resolution:
            raise ValueError(f"{path!r} holds a scorer for {res}x{res} images, expected {resolution}x{resolution}")
        shapes = traverse_util.flatten_dict(_param_shapes(res), sep="/")
        expect = {f"params/{k}": v.shape for k, v in shapes.items()}
        expect |= {"ref_mu": (FEATURE_DIM,), "ref_sigma": (FEATURE_DIM, FEATURE_DIM)}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expect:
            diff = sorted(set(got.items()) ^ set(expect.items()))
            raise ValueError(f"{path!r} does not match a {res}x{res} DigitScorer: differing (name, shape) "
                             f"entries {diff}")
        params = traverse_util.unflatten_dict(
            {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}, sep="/")
        return cls(res, params, tensors["ref_mu"], tensors["ref_sigma"])
