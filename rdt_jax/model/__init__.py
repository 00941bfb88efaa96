"""The RDT network in Flax NNX."""

from rdt_jax.model.config import EmaConfig, NoiseSchedulerConfig, RDTConfig, rdt_1b, rdt_170m
from rdt_jax.model.policy import RDTPolicy, init_policy
from rdt_jax.model.rdt import RDT, CondKV

__all__ = [
    "RDT",
    "CondKV",
    "EmaConfig",
    "NoiseSchedulerConfig",
    "RDTConfig",
    "RDTPolicy",
    "init_policy",
    "rdt_1b",
    "rdt_170m",
]
