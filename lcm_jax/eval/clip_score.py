"""CLIP score of images against their prompts, as torchmetrics' ``CLIPScore``, from a transformers CLIP folder.

score = max(mean_i 100 * cos(image_embeds_i, text_embeds_i), 0), the embeddings being
CLIPModel's projected features (torchmetrics clamps the mean, not each pair; ``similarities``
gives the per-pair values). Images are preprocessed exactly as the folder's
``preprocessor_config.json`` says (transformers' CLIPImageProcessor, PIL resampling) and
prompts tokenised with its tokenizer, so a number here is comparable with one from
torchmetrics on the same folder. The in-loop evaluation of SD runs uses it (eval.clip_model).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models.clip import CLIPTextModel, load_tokenizer, tokenize
from lcm_jax.models.clip_vision import CLIPVisionModelWithProjection, load_clip_model

PREPROCESSOR_CONFIG = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EXPECTED = ("a transformers CLIP folder: config.json + model.safetensors (CLIPModel.save_pretrained), "
            f"{PREPROCESSOR_CONFIG} (CLIPImageProcessor) and a CLIPTokenizer (vocab.json + merges.txt "
            "or tokenizer.json)")


def _hw(value: Any, what: str) -> tuple[int, int]:
    """(height, width) of a crop_size / size given as an int or {"height", "width"}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping) and {"height", "width"} <= set(value):
        return int(value["height"]), int(value["width"])
    raise ValueError(f"{what} {value!r}: expected an int or {{'height': H, 'width': W}}")


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """The steps of transformers' CLIPImageProcessor (defaults are its own): resize, center crop,
    rescale, normalise. ``shortest_edge`` or ``resize_to`` (h, w) when resizing."""

    shortest_edge: Optional[int] = 224
    resize_to: Optional[tuple[int, int]] = None
    resample: int = 3  # PIL.Image.BICUBIC
    crop: Optional[tuple[int, int]] = (224, 224)
    rescale_factor: Optional[float] = 1 / 255
    mean: Optional[tuple[float, ...]] = OPENAI_CLIP_MEAN
    std: Optional[tuple[float, ...]] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ImageProcessing":
        """From a preprocessor_config.json dict; an int ``size`` is the shortest edge (CLIP's rule)."""
        shortest, resize_to = None, None
        if cfg.get("do_resize", True):
            size = cfg.get("size", {"shortest_edge": 224})
            if isinstance(size, int):
                shortest = size
            elif isinstance(size, Mapping) and "shortest_edge" in size and "longest_edge" not in size:
                shortest = int(size["shortest_edge"])
            else:
                resize_to = _hw(size, "size")
        crop = _hw(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", True) else None
        norm = cfg.get("do_normalize", True)
        return cls(shortest, resize_to, int(cfg.get("resample", 3)), crop,
                   float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
                   tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)) if norm else None,
                   tuple(cfg.get("image_std", OPENAI_CLIP_STD)) if norm else None)

    @property
    def output_size(self) -> Optional[tuple[int, int]]:
        """(h, w) of every output, or None when it depends on the input's aspect ratio."""
        return self.crop or self.resize_to

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 pixel_values [N, 3, h, w], one image at a time as transformers."""
        return np.stack([self._one(im) for im in images]).transpose(0, 3, 1, 2)

    def _one(self, image: np.ndarray) -> np.ndarray:  # [H, W, 3] uint8 -> [h, w, 3] float32
        from PIL import Image
        h, w = image.shape[:2]
        if self.shortest_edge:  # transformers' get_resize_output_image_size(default_to_square=False)
            s, long = self.shortest_edge, int(self.shortest_edge * max(h, w) / min(h, w))
            size = (long, s) if w <= h else (s, long)
        else:
            size = self.resize_to
        if size is not None:
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=self.resample))
        if self.crop:
            image = _center_crop(image, *self.crop)
        x = image.astype(np.float64) * self.rescale_factor if self.rescale_factor else image
        x = x.astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x


def _center_crop(image: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' center_crop: [H, W, C] -> [ch, cw, C], zero-padded (top/left first) if smaller."""
    dh, dw = max(ch - image.shape[0], 0), max(cw - image.shape[1], 0)
    image = np.pad(image, ((math.ceil(dh / 2), dh // 2), (math.ceil(dw / 2), dw // 2), (0, 0)))
    top, left = (image.shape[0] - ch) // 2, (image.shape[1] - cw) // 2
    return image[top:top + ch, left:left + cw]


@dataclasses.dataclass
class CLIPScorer:
    """A CLIP model's two towers, its tokenizer and image preprocessing; jitted embedding functions
    compiled once per batch shape (inputs go in chunks of ``batch_size``, the last one padded)."""

    text_model: CLIPTextModel
    vision_model: CLIPVisionModelWithProjection
    params: Any  # {"text": ..., "vision": ...}
    tokenizer: Any
    processing: ImageProcessing
    max_length: int
    batch_size: int = 64

    def __post_init__(self):
        text, vision = self.text_model, self.vision_model
        self._text_fn = jax.jit(lambda p, ids: text.apply({"params": p}, ids).text_embeds)  # [B, L] -> [B, P]
        self._image_fn = jax.jit(lambda p, x: vision.apply({"params": p}, x).image_embeds)  # [B, 3, S, S] -> [B, P]

    @classmethod
    def from_pretrained(cls, folder: str, dtype: Any = jnp.float32, batch_size: int = 64) -> "CLIPScorer":
        """Load a CLIP folder (e.g. openai/clip-vit-large-patch14, torchmetrics' default); every
        problem is raised here, naming the folder and what is expected."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"CLIP model folder {folder!r} does not exist: expected {EXPECTED}")
        path = os.path.join(folder, PREPROCESSOR_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r} has no {PREPROCESSOR_CONFIG}: expected {EXPECTED}")
        try:
            with open(path) as f:
                processing = ImageProcessing.from_config(json.load(f))
        except (ValueError, TypeError) as e:
            raise ValueError(f"cannot read {path!r} as a CLIPImageProcessor config: {e}") from e
        text, vision, params = load_clip_model(folder, jnp.dtype(dtype))
        side = vision.config.image_size
        if processing.output_size != (side, side):
            raise ValueError(f"{path!r} makes {processing.output_size or 'aspect-dependent'} images but the "
                             f"vision tower takes {side}x{side}: expected crop_size (or size) {side}")
        tokenizer = load_tokenizer(folder)
        max_len = text.config.max_position_embeddings
        if 0 < tokenizer.model_max_length < max_len:
            max_len = tokenizer.model_max_length
        return cls(text, vision, params, tokenizer, processing, max_len, batch_size)

    def _batched(self, fn, params: Any, x: np.ndarray) -> np.ndarray:
        """fn over x [N, ...] in chunks of min(batch_size, N), the last one padded: one shape, one compile."""
        b = min(self.batch_size, len(x))
        out = []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(fn(params, chunk))[:b - pad])
        return np.concatenate(out)

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """CLIPModel.get_image_features of uint8 images [N, H, W, 3] -> float32 [N, P] (not normalised)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or not len(images):
            raise ValueError(f"expected uint8 images [N, H, W, 3] with N >= 1, got {images.dtype} {images.shape}")
        return self._batched(self._image_fn, self.params["vision"], self.processing(images))

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """CLIPModel.get_text_features of the prompts -> float32 [N, P] (padded to max_length, truncated)."""
        ids = tokenize(self.tokenizer, list(prompts), self.max_length)  # [N, L]
        return self._batched(self._text_fn, self.params["text"], ids)

    def similarities(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """100 * cos(image_i, prompt_i) -> float64 [N]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: expected one prompt per image")
        a, b = (e.astype(np.float64) for e in (self.image_embeds(images), self.text_embeds(prompts)))
        a /= np.linalg.norm(a, axis=-1, keepdims=True)
        b /= np.linalg.norm(b, axis=-1, keepdims=True)
        return 100.0 * np.sum(a * b, axis=-1)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> float:
        """torchmetrics' CLIPScore of uint8 images [N, H, W, 3] and their prompts [N]."""
        return float(max(np.mean(self.similarities(images, prompts)), 0.0))
