"""vae_dist: the MNIST VAE trained across GPUs and nodes with Accelerate."""

__version__ = "0.1.0"
