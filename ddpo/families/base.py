"""The policy interface: what the sampler, the update, `ddpo generate` and the UI need from a model family.

A family wraps one diffusers pipeline and answers, in the same tensor conventions for every model:

| method                | what it does                                                        | shapes                  |
|-----------------------|---------------------------------------------------------------------|-------------------------|
| `encode`              | prompts -> conditioning (embeddings, pooled, size ids ...)          | `Cond` of (B, ...)      |
| `set_steps`           | the sampling schedule of T steps; `timesteps` then holds model times | (T,)                    |
| `latent_shape`        | the shape of x_T (packed for FLUX)                                  | (B, ...)                |
| `predict`             | the denoiser's output with classifier-free guidance                 | like the latents        |
| `step_mean_std`       | the Gaussian policy of step i: pi(x_{i+1} \\| x_i) = N(mean, std^2)  | (B, ...), (B, 1, ...)   |
| `step_stds`           | std of every step of the schedule (0: deterministic, not trained)   | (T,)                    |
| `train_times`/`add_noise` | forward noising of final samples at random times (RWR, DiffusionNFT) | (B,), (B, ...)      |
| `decode`              | latents -> images in [0, 1] on the CPU                              | (B, 3, H, W)            |

Steps are numbered 0..T-1 in sampling order (step i maps x_i to x_{i+1}; x_0 is the noise and x_T the sample,
as the trajectories store them). `noise_level` is the policy's stochasticity, `sample.eta` in the config: DDIM's
eta for the UNet families, the SDE noise level a for the flow families; 0 is the deterministic sampler.

Nothing outside `ddpo/families/` branches on the family: a new family subclasses `Family` (or `FlowFamily`) in
its own module and registers its pipeline class in `ddpo/families/__init__.py` (see docs/models.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch


class Cond(dict):
    """A model's conditioning: name -> tensor batched on dim 0 (B, ...). Index, expand and concatenate as one."""

    def rows(self, index: torch.Tensor) -> "Cond":
        return Cond({k: v[index] for k, v in self.items()})

    def expand(self, batch: int) -> "Cond":
        """Each (1, ...) tensor repeated to (batch, ...) (a view, as `Tensor.expand`)."""
        return Cond({k: v.expand(batch, *v.shape[1:]) for k, v in self.items()})

    def map(self, fn) -> "Cond":
        return Cond({k: fn(v) for k, v in self.items()})

    @staticmethod
    def cat(parts: list["Cond"]) -> "Cond":
        return Cond({k: torch.cat([p[k] for p in parts]) for k in parts[0]})

    @staticmethod
    def pair(negative: "Cond", positive: "Cond") -> "Cond":
        """[negative; positive] along the batch, for one CFG call."""
        return Cond({k: torch.cat([negative[k], positive[k]]) for k in positive})


class Family:
    """One model family behind the policy interface. Subclasses set the class variables and implement the
    methods that raise NotImplementedError."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this family loads
    denoiser_attr: ClassVar[str]  # the pipeline attribute of the trained model: "unet" or "transformer"
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    uses_cfg: ClassVar[bool] = True  # False: guidance is an input of the model (FLUX.1-dev), not a second pass
    # LoRA file keys: UNet LoRAs are saved in diffusers' older `lora.down/up` naming, as diffusers' SD and SDXL
    # training scripts save them; transformers in peft's `lora_A/B` naming, as its SD3 and FLUX scripts do (diffusers'
    # converter renames only some of a transformer's keys, and its loader then skips the renamed ones).
    lora_keys_in_diffusers_naming: ClassVar[bool] = True

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.num_steps: int | None = None
        self.timesteps: torch.Tensor | None = None  # (T,): the denoiser's time input at each step
        self.resolution = self.default_resolution()  # image side in pixels (`model.resolution`, 0 = this)

    def default_resolution(self) -> int:
        """The model's native image size in pixels."""
        raise NotImplementedError

    def set_resolution(self, pixels: int) -> None:
        """Sample images of `pixels` x `pixels` (0: the model's default)."""
        self.resolution = pixels or self.default_resolution()

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str, revision: str | None = None) -> "Family":
        """Load the pipeline at `path` (a local folder or hub id) as this family."""
        raise NotImplementedError

    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_attr)

    @denoiser.setter
    def denoiser(self, model) -> None:
        setattr(self.pipe, self.denoiser_attr, model)

    def text_encoders(self) -> list:
        return [m for m in (getattr(self.pipe, f"text_encoder{s}", None) for s in ("", "_2", "_3")) if m is not None]

    def tokenizers(self) -> list:
        return [t for t in (getattr(self.pipe, f"tokenizer{s}", None) for s in ("", "_2", "_3")) if t is not None]

    def frozen_modules(self) -> list:
        """The modules that are never trained (text encoders, VAE)."""
        return [*self.text_encoders(), self.pipe.vae]

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    # ------------------------------------------------------------------------------------------ policy

    def encode(self, prompts: list[str], device: torch.device) -> Cond:
        raise NotImplementedError

    def set_steps(self, num_steps: int, device: torch.device | str = "cpu") -> None:
        raise NotImplementedError

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """x_0 of the trajectory from a N(0, I) draw of `latent_shape`."""
        return noise

    def predict(self, model, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond, negative: Cond,
                guidance_scale: float) -> torch.Tensor:
        raise NotImplementedError

    def step_mean_std(self, output: torch.Tensor, step: torch.Tensor, latents: torch.Tensor,
                      noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step_stds(self, noise_level: float) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ forward noising

    def train_times(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One random diffusion time per generator (B,), in the denoiser's time units."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, the denoiser's regression target) at `times` (B,) for final samples x0 (B, ...)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ weights

    def save_lora(self, model, folder: Path) -> None:
        """`pytorch_lora_weights.safetensors` in diffusers' format: `pipe.load_lora_weights(folder)` loads it."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(model)
        if self.lora_keys_in_diffusers_naming:
            layers = convert_state_dict_to_diffusers(layers)
        type(self.pipe).save_lora_weights(folder, safe_serialization=True,
                                          **{f"{self.denoiser_attr}_lora_layers": layers})

    def load_lora(self, model, folder: Path) -> None:
        """Load `save_lora`'s file into `model`, which carries LoRA adapters of the same settings."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        prefix = f"{self.denoiser_attr}."
        state = load_file(folder / "pytorch_lora_weights.safetensors")
        state = convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in state.items()})
        result = set_peft_model_state_dict(model, state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            from ddpo.checkpoint import CheckpointError

            raise CheckpointError(f"{folder}: LoRA weights have keys this {self.denoiser_attr} does not: "
                                  f"{result.unexpected_keys[:3]}...")

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse settings this family cannot honour (ConfigError). Called before the weights load."""
