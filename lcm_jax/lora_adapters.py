"""LoRA adapters on a pipeline, with diffusers' method names (load_lora_weights, set_adapters,
fuse_lora, ...): the adapter state and its rules; the pipeline's sampler merges the unfused ones."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from lcm_jax import lora, lora_files
from lcm_jax.models.params import place


class LoraAdapters:
    """Mixed into LCMPipeline, which declares the state: ``unet_params`` and ``_lora`` (name ->
    lcm_jax.lora tree, alpha folded in), ``_lora_weights`` (the active ones -> strength, merged inside
    the jitted sampler unless fused), ``_lora_fused`` (name -> scale fused into unet_params). Methods
    replace these dicts, never mutate them (dataclasses.replace shares them)."""

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Union[str, dict],
                          adapter_name: Optional[str] = None, *, weight_name: Optional[str] = None) -> None:
        """Add a UNet LoRA: a diffusers/PEFT or kohya .safetensors file, a folder holding one
        (``weight_name``, default pytorch_lora_weights.safetensors), or a state dict. It is
        active at strength 1 and unfused (merged inside each sampling call) until ``fuse_lora``."""
        name = adapter_name or f"default_{len(self._lora)}"
        if name in self._lora:
            raise ValueError(f"adapter name {name!r} is already in use (loaded: {sorted(self._lora)})")
        tree = place(lora_files.load_lora(pretrained_model_name_or_path_or_dict, self.unet_params, weight_name),
                     mesh=self.mesh)
        self._lora = {**self._lora, name: tree}
        self._lora_weights = {**self._lora_weights, name: 1.0}

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     adapter_weights: Union[None, float, Sequence[float]] = None) -> None:
        """Make exactly ``adapter_names`` active, with strengths ``adapter_weights`` (default 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(adapter_weights)} weights")
        unknown = [n for n in names if n not in self._lora]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {sorted(self._lora)}")
        if self._lora_fused:
            raise ValueError(f"adapters {sorted(self._lora_fused)} are fused: call unfuse_lora() first")
        self._lora_weights = {n: float(w) for n, w in zip(names, adapter_weights)}

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Merge the active adapters (or ``adapter_names``) into ``unet_params``, each at
        ``lora_scale`` x its strength; sampling then runs the plain UNet. Fused ones are skipped."""
        names = list(self._lora_weights) if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self._lora]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {sorted(self._lora)}")
        fused = dict(self._lora_fused)
        for n in names:
            if n not in fused:
                fused[n] = float(lora_scale) * self._lora_weights.get(n, 1.0)
                self.unet_params = lora.merge(self.unet_params, self._lora[n], fused[n])
        self._lora_fused = fused

    def unfuse_lora(self) -> None:
        """Subtract what ``fuse_lora`` added; the adapters stay loaded (active, unfused)."""
        for n, scale in self._lora_fused.items():
            self.unet_params = lora.unmerge(self.unet_params, self._lora[n], scale)
        self._lora_fused = {}

    def unload_lora_weights(self) -> None:
        """Drop every adapter. Fused weights stay fused, as in diffusers (fuse_lora then
        unload_lora_weights leaves a plain UNet with the LoRA baked in)."""
        self._lora, self._lora_weights, self._lora_fused = {}, {}, {}

    def save_lora_weights(self, save_directory: str, unet_lora_layers: Any = None, *,
                          alpha: Optional[float] = None, adapter_name: Optional[str] = None,
                          weight_name: str = lora_files.LORA_WEIGHT_NAME) -> str:
        """Write ``unet_lora_layers`` (a LoRA tree with its ``alpha``; default: the loaded
        adapter ``adapter_name``) as a diffusers ``pytorch_lora_weights.safetensors``."""
        if unet_lora_layers is None:
            if adapter_name is None and len(self._lora) != 1:
                raise ValueError(f"{len(self._lora)} adapters loaded ({sorted(self._lora)}): pass adapter_name")
            name = adapter_name or next(iter(self._lora))
            if name not in self._lora:
                raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self._lora)}")
            unet_lora_layers = self._lora[name]
        return lora_files.save_lora_weights(save_directory, unet_lora_layers, alpha, weight_name)

    def _unfused_lora(self) -> tuple:
        """((tree, strength), ...) the sampler merges: active adapters that are not fused."""
        return tuple((self._lora[n], self._replicate(np.float32(w))) for n, w in self._lora_weights.items()
                     if n not in self._lora_fused)
