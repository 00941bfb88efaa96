"""Weight conversion between the official PyTorch checkpoints and rdt-jax."""
