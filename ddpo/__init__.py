"""ddpo: reinforcement-learning finetuning of diffusion models (DDPO) and diffusion-policy steering (DSRL).

Heavy libraries (torch, diffusers, transformers) are imported lazily by the modules that need them,
so `import ddpo` and `ddpo --help` stay fast.
"""

import logging
import os
import sys

__version__ = "0.1.0"

# Library log lines that are not the user's business, dropped by their exact text (every other warning of
# these loggers still shows). Set here, on import, so that the reward worker process drops them too.
_NOT_ACTIONABLE = {
    # transformers 5 without torchvision: the image processors of CLIP/SigLIP fall back to their PIL versions,
    # which is what the rewards use anyway.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # Every DDPO checkpoint is a UNet-only LoRA, so diffusers finds nothing for the text encoder.
    "diffusers.loaders.lora_base": ("No LoRA keys associated to CLIPTextModel found",),
    "diffusers.loaders.lora_pipeline": ("No LoRA keys associated to CLIPTextModel found",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


for _name, _fragments in _NOT_ACTIONABLE.items():
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _DropMessages) for f in _logger.filters):
        _logger.addFilter(_DropMessages(_fragments))

# Model-loading progress bars ("Loading weights", "Loading pipeline components") are noise in a redirected log; a
# terminal still shows them. The variable reaches transformers/huggingface_hub here and in spawned reward workers;
# diffusers has no such variable, so `ddpo.pipeline` turns its bars off the same way.
if not sys.stderr.isatty():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
