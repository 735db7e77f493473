"""The diffusion model: data, the UNet and its checkpoints, training, sampling."""
