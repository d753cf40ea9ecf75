"""`sd`: Stable Diffusion 1.x/2.x (UNet2DConditionModel + DDIM), the DDPO paper's model.

The policy is the DDIM posterior with eta > 0 (ddpo/logprob.py). Whatever scheduler the folder ships, sampling
and training use a `DDIMScheduler` built from its config.
"""

from __future__ import annotations

from typing import Any

import torch

from ddpo.families.base import Cond, Family
from ddpo.logprob import ddim_step_mean_std, step_std
from ddpo.transfer import to_device


class SDFamily(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_attr = "unet"

    @classmethod
    def load(cls, path: str, revision: str | None = None) -> "SDFamily":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(path, revision=revision, **cls._load_kwargs())
        return cls(pipe)

    @classmethod
    def _load_kwargs(cls) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def __init__(self, pipe: Any):
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe)

    def default_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor

    # ------------------------------------------------------------------------------------------ policy

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> Cond:
        """{"embeds": (B, 77, D)}: the text encoder's hidden states, padded to the tokenizer's max length."""
        tokens = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt")
        return Cond(embeds=self.pipe.text_encoder(to_device(tokens.input_ids, device))[0])

    def set_steps(self, num_steps: int, device: torch.device | str = "cpu") -> None:
        self.pipe.scheduler.set_timesteps(num_steps, device=device)
        self.num_steps, self.timesteps = num_steps, self.pipe.scheduler.timesteps

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        size = self.resolution // self.pipe.vae_scale_factor
        return (batch, self.pipe.unet.config.in_channels, size, size)

    def _unet_kwargs(self, cond: Cond) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["embeds"]}

    def predict(self, model, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond, negative: Cond,
                guidance_scale: float) -> torch.Tensor:
        """UNet output (B, C, h, w) with classifier-free guidance; timesteps (B,). Guidance 1 skips the
        unconditional pass."""
        if guidance_scale == 1.0:
            return model(latents, timesteps, **self._unet_kwargs(cond)).sample
        output = model(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                       **self._unet_kwargs(Cond.pair(negative, cond))).sample
        uncond, conditional = output.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    def step_mean_std(self, output: torch.Tensor, step: torch.Tensor, latents: torch.Tensor,
                      noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
        return ddim_step_mean_std(self.pipe.scheduler, output, self.timesteps[step], latents, noise_level)

    def step_stds(self, noise_level: float) -> torch.Tensor:
        return step_std(self.pipe.scheduler, self.timesteps, noise_level)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    # ------------------------------------------------------------------------------------------ forward noising

    def train_times(self, generators: list[torch.Generator]) -> torch.Tensor:
        n = self.pipe.scheduler.config.num_train_timesteps
        return torch.cat([torch.randint(0, n, (1,), generator=g) for g in generators])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        scheduler = self.pipe.scheduler
        noisy = scheduler.add_noise(x0, noise, times)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return noisy, noise
        if kind == "v_prediction":
            return noisy, scheduler.get_velocity(x0, noise, times)
        return noisy, x0

    @classmethod
    def check_config(cls, config) -> None:
        from ddpo.config import ConfigError

        if config.sample.flow_step != "sde":
            raise ConfigError(f"sample.flow_step={config.sample.flow_step} chooses the step of flow-matching models; "
                              f"model.pretrained={config.model.pretrained!r} is a {cls.name} model (DDIM). Remove it")


class SDXLFamily(SDFamily):
    """`sdxl`: two text encoders (concatenated hidden states, pooled text embedding of the second) and the
    size/crop conditioning ("time ids": original size, crop top-left, target size) of SDXL's UNet."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    @classmethod
    def _load_kwargs(cls) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> Cond:
        """{"embeds": (B, 77, D1 + D2), "pooled": (B, P), "time_ids": (B, 6)}; an all-empty batch of prompts is
        zeros where the model says so (`force_zeros_for_empty_prompt`, as the pipeline's negative prompt)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        if all(p == "" for p in prompts) and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=device)
        return Cond(embeds=embeds, pooled=pooled, time_ids=time_ids.expand(len(prompts), -1))

    def _unet_kwargs(self, cond: Cond) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["embeds"],
                "added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}
