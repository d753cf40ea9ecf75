"""DSRL: steer frozen diffusion control policies by choosing their initial noise with RL.

Modules (imported lazily; nothing heavy is imported by this file):
  policy      DiffusionPolicy (MLP noise predictor, DDPM training, DDIM eta=0 sampling), SteerablePolicy, CallablePolicy
  experts     scripted experts for Pendulum-v1 / Reacher-v5 and the degraded demonstrator
  bc, base    behaviour cloning and the recipes of the shipped base policies (pretrained/)
  noise_env   NoiseActionEnv: the latent-noise environment (SB3's SAC on it is DSRL-SAC)
  dsrl_na     DSRL-NA (noise-aliased), train_na its loop; sb3 the SB3 SAC glue; train the run driver
  evaluate    fixed-seed evaluation and base-vs-steered GIFs; api  functions for the UI; cli  `ddpo steer`
"""
