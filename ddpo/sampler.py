"""Sampling trajectories: the denoising loop of Stable Diffusion with per-step log-probabilities.

Written against the pipeline's components (tokenizer, text encoder, UNet, DDIM scheduler, VAE), so that
the same `predict_noise` runs at sampling and at training time and importance ratios start at exactly 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddpo.logprob import ddim_step_mean_std, ddim_step_with_logprob


class Trajectories(NamedTuple):
    """A batch of B denoising trajectories of T steps (all float32 unless noted)."""

    latents: torch.Tensor  # (B, T+1, C, h, w): x_T, ..., x_0
    log_probs: torch.Tensor  # (B, T): log pi(x_{t-1} | x_t) when sampled; NaN when eta = 0 (no density)
    timesteps: torch.Tensor  # (B, T) long: t at each step
    prompt_embeds: torch.Tensor  # (B, L, D)
    negative_embeds: torch.Tensor  # (B, L, D): the unconditional (negative-prompt) embedding
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], on the CPU


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Text-encoder hidden states (B, L, D) of `prompts`, padded to the tokenizer's max length (77 for CLIP)."""
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids.to(device))[0]


def predict_noise(unet, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                  negative_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """UNet output (B, C, h, w) with classifier-free guidance; timesteps (B,). Guidance 1 skips the unconditional pass."""
    if guidance_scale == 1.0:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
    output = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                  encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
    uncond, cond = output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], float32 on the CPU."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


def latent_shape(pipe, batch_size: int) -> tuple[int, int, int, int]:
    size = pipe.unet.config.sample_size
    return (batch_size, pipe.unet.config.in_channels, size, size)


@torch.no_grad()
def sample_trajectories(pipe, unet, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, *, num_steps: int,
                        guidance_scale: float, eta: float, generator: torch.Generator,
                        progress: bool = False, initial_noise: torch.Tensor | None = None) -> Trajectories:
    """Run the DDIM loop from x_T ~ N(0, I) and record every step.

    `unet` is passed separately from `pipe` because during training it is the (possibly DDP-wrapped, LoRA)
    policy. Noise comes only from `generator` (a CPU generator), so a seed fixes the whole trajectory.
    `initial_noise` (B, C, h, w), if given, is x_T's N(0, I) draw instead (e.g. one seed per evaluation prompt).
    """
    from tqdm.auto import tqdm

    device = prompt_embeds.device
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    batch = prompt_embeds.shape[0]
    noise = torch.randn(latent_shape(pipe, batch), generator=generator) if initial_noise is None else initial_noise
    latents = noise.to(device) * scheduler.init_noise_sigma
    all_latents, all_log_probs = [latents], []
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
        timesteps = t.expand(batch)
        noise_pred = predict_noise(unet, scheduler.scale_model_input(latents, t), timesteps, prompt_embeds,
                                   negative_embeds, guidance_scale)
        if eta > 0:
            latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, eta=eta,
                                                       generator=generator)
        else:  # deterministic DDIM (evaluation): the policy has no density here
            latents, _ = ddim_step_mean_std(scheduler, noise_pred, timesteps, latents, eta=0.0)
            log_prob = torch.full((batch,), float("nan"), device=device)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return Trajectories(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        timesteps=scheduler.timesteps.expand(batch, -1).clone(),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        images=decode_latents(pipe.vae, latents),
    )
