"""ddpo: reinforcement-learning finetuning of diffusion models (DDPO) and diffusion-policy steering (DSRL).

Heavy libraries (torch, diffusers, transformers) are imported lazily by the modules that need them,
so `import ddpo` and `ddpo --help` stay fast.
"""

__version__ = "0.1.0"
