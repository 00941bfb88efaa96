"""Training: mesh + sharding rules, jitted train step, Orbax checkpoints, the loop (see loop.py)."""
