"""Flow-matching families: `sd3` (SD3 / SD3.5) and `flux` (FLUX.1-dev and -schnell).

Rectified flow: x_t = (1 - t) x_0 + t eps with t (diffusers' sigma) from 1 to 0, the model predicts the velocity
v = eps - x_0, and the ODE step is x_{t+dt} = x_t + v dt. The policy turns that step into the SDE with the same
marginals of Flow-GRPO (ddpo/flow_sde.py), so each step has a Gaussian log-probability exactly as a DDIM step has.
`sample.flow_step=cps` uses the coefficients-preserving variant instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ddpo.families.attention import TEXT_COPIES_KWARG, use_repeated_tokens
from ddpo.families.base import Cond, Family
from ddpo.transfer import to_device

T5_TOKENS = 256  # SD3's max_sequence_length: encode_prompt appends this many zero tokens without T5


class FlowFamily(Family):
    """What every flow-matching family shares: the sigma schedule, the SDE step, forward noising, decoding."""

    denoiser_attr = "transformer"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")
    step_kind = "sde"  # `sample.flow_step`, set by the trainer
    lora_keys_in_diffusers_naming = False

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        self.sigmas: torch.Tensor | None = None  # (T+1,): t at each step, then 0

    @classmethod
    def load(cls, path: str, revision: str | None = None) -> "FlowFamily":
        from diffusers import DiffusionPipeline

        return cls(DiffusionPipeline.from_pretrained(path, revision=revision, **cls._load_kwargs(path, revision)))

    @classmethod
    def _load_kwargs(cls, path: str, revision: str | None) -> dict[str, Any]:
        return {}

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {}

    def _dynamic_shift(self, seq_len: int, max_shift: float) -> dict[str, Any]:
        """{"mu": shift} for a scheduler with resolution-dependent shifting (its pipeline's `calculate_shift` of the
        image's token count; `max_shift` is the pipeline's default), else {}."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return {"mu": calculate_shift(seq_len, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", max_shift))}

    def set_steps(self, num_steps: int, device: torch.device | str = "cpu") -> None:
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(device=device, **self._schedule_kwargs(num_steps))
        self.num_steps = num_steps
        self.sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        self.timesteps = scheduler.timesteps

    def step_mean_std(self, output: torch.Tensor, step: torch.Tensor, latents: torch.Tensor,
                      noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
        from ddpo.flow_sde import flow_cps_mean_std, flow_sde_mean_std

        step = to_device(step, self.sigmas.device)
        mean_std = flow_cps_mean_std if self.step_kind == "cps" else flow_sde_mean_std
        return mean_std(output, latents, self.sigmas[step], self.sigmas[step + 1], noise_level,
                        self.sigmas[min(1, len(self.sigmas) - 1)])

    def step_stds(self, noise_level: float) -> torch.Tensor:
        steps = torch.arange(self.num_steps)
        zeros = torch.zeros(self.num_steps, 1)
        _, std = self.step_mean_std(zeros, steps, zeros, noise_level)
        return std.reshape(-1).cpu()

    def train_times(self, generators: list[torch.Generator]) -> torch.Tensor:
        """t ~ U(0, 1) per sample, in the transformer's time units (t x num_train_timesteps)."""
        n = self.pipe.scheduler.config.num_train_timesteps
        return torch.cat([torch.rand((1,), generator=g) for g in generators]) * n

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        t = (times.float() / self.pipe.scheduler.config.num_train_timesteps).to(x0.device)
        t = t.reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * noise, noise - x0

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1).cpu()

    @classmethod
    def check_config(cls, config) -> None:
        from ddpo.config import ConfigError

        if config.model.channels_last:  # a transformer has no convolutions after its patch embedding
            raise ConfigError(f"model.channels_last=true applies to the UNet families (sd, sdxl); "
                              f"model.pretrained={config.model.pretrained!r} is a {cls.name} transformer. Remove it")


class SD3Family(FlowFamily):
    """`sd3`: SD3 / SD3.5 (SD3Transformer2DModel; CLIP-L, CLIP-G and an optional T5), with CFG."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    # Without T5 the pipeline appends T5_TOKENS identical zero tokens; `encode` keeps one and `predict` counts it
    # T5_TOKENS times (the same function, float rounding apart). False: the full sequence (benchmarks, tests).
    repeated_tokens = True

    @classmethod
    def _load_kwargs(cls, path: str, revision: str | None) -> dict[str, Any]:
        from ddpo.families import read_model_index

        index = read_model_index(path, revision)
        no_t5 = index.get("text_encoder_3", [None])[-1] is None  # a folder saved without T5
        return {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}

    def default_resolution(self) -> int:
        return int(self.pipe.transformer.config.sample_size) * self.pipe.vae_scale_factor

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        patch = self.pipe.transformer.config.patch_size
        seq_len = (self.resolution // self.pipe.vae_scale_factor // patch) ** 2
        return {"num_inference_steps": num_steps, **self._dynamic_shift(seq_len, max_shift=1.16)}  # as SD3's pipeline

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> Cond:
        """{"embeds": (B, 77 + 256, 4096), "pooled": (B, 2048)} at SD3.5's sizes, by the pipeline's encoder; without
        T5, embeds (B, 77 + 1, 4096): the 256 zero tokens as one, which `predict` attends to as to 256."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=T5_TOKENS)
        return Cond(embeds=self._without_repeated_zeros(embeds), pooled=pooled)

    def _short_length(self) -> int:
        """Text tokens of a shortened encoding: the CLIP tokens and one zero token."""
        return int(self.pipe.tokenizer_max_length) + 1

    def _without_repeated_zeros(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, L_clip + 256, D) -> (B, L_clip + 1, D) when the last 256 tokens are exactly zero (the pipeline has no
        T5); anything else (a T5, a pipeline that pads otherwise) is kept whole and runs the standard attention."""
        if (not self.repeated_tokens or self.pipe.text_encoder_3 is not None
                or embeds.shape[1] != self._short_length() - 1 + T5_TOKENS or embeds[:, -T5_TOKENS:].any()):
            return embeds
        return embeds[:, :self._short_length()]

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        size = self.resolution // self.pipe.vae_scale_factor
        return (batch, self.pipe.transformer.config.in_channels, size, size)

    def predict(self, model, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond, negative: Cond,
                guidance_scale: float) -> torch.Tensor:
        """Velocity (B, C, h, w) with classifier-free guidance; timesteps (B,) in [0, 1000]."""
        if guidance_scale != 1.0:
            uncond, conditional = self._velocity(model, torch.cat([latents, latents]),
                                                 torch.cat([timesteps, timesteps]),
                                                 Cond.pair(negative, cond)).chunk(2)
            return uncond + guidance_scale * (conditional - uncond)
        return self._velocity(model, latents, timesteps, cond)

    def _velocity(self, model, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The transformer's output (B, C, h, w). A shortened encoding (`encode` without T5) runs with its last token
        counted T5_TOKENS times (ddpo/families/attention.py), or, on a model whose attention processors are not
        diffusers' standard ones (xformers, fused projections), with the zero tokens restored."""
        embeds, extra = cond["embeds"], {}
        if embeds.shape[1] == self._short_length():
            if use_repeated_tokens(model):
                extra = {"joint_attention_kwargs": {TEXT_COPIES_KWARG: T5_TOKENS}}
            else:
                embeds = torch.cat([embeds, embeds[:, -1:].expand(-1, T5_TOKENS - 1, -1)], dim=1)
        return model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                     pooled_projections=cond["pooled"], return_dict=False, **extra)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae_decode(latents)


class FluxFamily(FlowFamily):
    """`flux`: FLUX.1 (FluxTransformer2DModel; CLIP-L pooled + T5). Guidance-distilled: FLUX.1-dev takes the
    guidance scale as an input (one pass, no CFG); FLUX.1-schnell has no guidance (sample.guidance_scale=1).
    Latents are packed: (B, h/2 * w/2, 4C), 2x2 patches as tokens."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    uses_cfg = False

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.pipe.vae_scale_factor

    def _latent_side(self) -> int:
        return 2 * (self.resolution // (self.pipe.vae_scale_factor * 2))

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        seq_len = (self._latent_side() // 2) ** 2
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps),  # as FluxPipeline does
                **self._dynamic_shift(seq_len, max_shift=1.15)}

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> Cond:
        """{"embeds": (B, L_t5, 4096), "pooled": (B, 768)} at FLUX.1's sizes (text ids are rebuilt per call)."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=device,
                                                    max_sequence_length=self._max_sequence_length())
        return Cond(embeds=embeds, pooled=pooled)

    def _max_sequence_length(self) -> int:
        return min(512, int(getattr(self.pipe.tokenizer_2, "model_max_length", 512)))

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        side = self._latent_side()
        return (batch, (side // 2) ** 2, self.pipe.transformer.config.in_channels)

    def predict(self, model, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond, negative: Cond,
                guidance_scale: float) -> torch.Tensor:
        """Velocity (B, N, 4C) of packed latents; the guidance scale is an input of FLUX.1-dev."""
        config = getattr(model, "config", None) or self.pipe.transformer.config
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), guidance_scale, device=latents.device, dtype=torch.float32)
        elif guidance_scale != 1.0:
            from ddpo.config import ConfigError

            raise ConfigError(f"sample.guidance_scale={guidance_scale}: this FLUX model has no guidance input "
                              "(FLUX.1-schnell); set sample.guidance_scale=1")
        side = self._latent_side() // 2
        img_ids = self.pipe._prepare_latent_image_ids(1, side, side, latents.device, latents.dtype)
        txt_ids = torch.zeros(cond["embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        return model(hidden_states=latents, timestep=timesteps / 1000, guidance=guidance,
                     pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"], txt_ids=txt_ids,
                     img_ids=img_ids, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        unpacked = self.pipe._unpack_latents(latents, self.resolution, self.resolution, self.pipe.vae_scale_factor)
        return self._vae_decode(unpacked)
