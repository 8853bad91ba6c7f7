"""diffusers' train_lcm_distill_sd_wds.py LCD step in PyTorch, the baseline benchmarks/train_step.py
times beside the jitted JAX step (tiny UNets, cached latents and prompt embeddings)."""
from __future__ import annotations

import copy

import numpy as np

from lcm_jax.tiny import SD_SCHEDULER


class TorchLCD:
    """diffusers' train_lcm_distill_sd_wds.py loop body (steps 2-12) on tiny diffusers UNets
    matching lcm_jax.tiny.tiny_configs, fed cached latents and prompt embeddings."""

    def __init__(self, config, batch: dict, uncond: np.ndarray):
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel as TorchUNet
        self.torch, self.config = torch, config
        kw = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8)
        torch.manual_seed(0)
        self.teacher = TorchUNet(**kw).eval().requires_grad_(False)
        self.unet = TorchUNet(**kw, time_cond_proj_dim=config.time_cond_proj_dim).train()
        self.unet.load_state_dict(self.teacher.state_dict(), strict=False)
        self.target = copy.deepcopy(self.unet).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=config.learning_rate,
                                     betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
                                     weight_decay=config.weight_decay)
        sched = DDPMScheduler.from_config(SD_SCHEDULER)
        self.sched = sched
        ac = sched.alphas_cumprod
        self.alpha, self.sigma = ac.sqrt(), (1 - ac).sqrt()
        n = config.lcd.num_ddim_timesteps
        self.topk = 1000 // n
        ddim_t = (np.arange(1, n + 1) * self.topk).round().astype(np.int64) - 1
        self.ddim_t = torch.from_numpy(ddim_t)
        self.ddim_prev = torch.from_numpy(np.asarray([ac[0].item()] + ac.numpy()[ddim_t[:-1]].tolist()))
        self.mean, self.logvar = torch.from_numpy(batch["latent_mean"]), torch.from_numpy(batch["latent_logvar"])
        self.cond = torch.from_numpy(batch["prompt_embeds"])
        self.uncond = torch.from_numpy(uncond).expand_as(self.cond)

    def _scalings(self, t, sigma_data=0.5, scaling=10.0):
        s = scaling * t
        return (sigma_data ** 2 / (s ** 2 + sigma_data ** 2)).view(-1, 1, 1, 1), \
            (s / (s ** 2 + sigma_data ** 2) ** 0.5).view(-1, 1, 1, 1)

    def _x0(self, out, t, z):
        return (z - self.sigma[t].view(-1, 1, 1, 1) * out) / self.alpha[t].view(-1, 1, 1, 1)

    def _w_emb(self, w, dim):
        torch = self.torch
        w = w * 1000.0
        half = dim // 2
        e = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        e = w[:, None] * e[None, :]
        return torch.cat([torch.sin(e), torch.cos(e)], dim=1)

    def step(self) -> float:
        torch, c = self.torch, self.config
        latents = (self.mean + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mean)) * 0.18215
        bsz = latents.shape[0]
        noise = torch.randn_like(latents)
        index = torch.randint(0, c.lcd.num_ddim_timesteps, (bsz,)).long()
        start_t = self.ddim_t[index]
        t = torch.clamp(start_t - self.topk, min=0)
        cs_start, co_start = self._scalings(start_t)
        cs, co = self._scalings(t)
        z = self.sched.add_noise(latents, noise, start_t)
        w = (c.lcd.omega_max - c.lcd.omega_min) * torch.rand((bsz,)) + c.lcd.omega_min
        w_emb = self._w_emb(w, c.time_cond_proj_dim)
        w = w.view(-1, 1, 1, 1)
        pred = self.unet(z, start_t, timestep_cond=w_emb, encoder_hidden_states=self.cond).sample
        model_pred = cs_start * z + co_start * self._x0(pred, start_t, z)
        with torch.no_grad():
            cond_out = self.teacher(z, start_t, encoder_hidden_states=self.cond).sample
            uncond_out = self.teacher(z, start_t, encoder_hidden_states=self.uncond).sample
            x0 = self._x0(cond_out, start_t, z) + w * (self._x0(cond_out, start_t, z) - self._x0(uncond_out, start_t, z))
            eps = cond_out + w * (cond_out - uncond_out)
            prev = self.ddim_prev[index].view(-1, 1, 1, 1).float()
            x_prev = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
            tgt = self.target(x_prev, t, timestep_cond=w_emb, encoder_hidden_states=self.cond).sample
            target = cs * x_prev + co * self._x0(tgt, t, x_prev)
        loss = torch.nn.functional.mse_loss(model_pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the script's update_ema(target_unet.parameters(), unet.parameters(), decay)
            for tp, p in zip(self.target.parameters(), self.unet.parameters()):
                tp.detach().mul_(c.lcd.ema_decay).add_(p, alpha=1 - c.lcd.ema_decay)
        return loss.item()
