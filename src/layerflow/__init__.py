"""layerflow: transformer language models as dynamical systems over layer-time."""

from .config import DataConfig, FlowConfig, ModelConfig, RunConfig, TrainConfig
from .fields import MLP, CausalSelfAttention, KVCache, TransformerField
from .fields.energy import EnergyAttention, EnergyLayerNorm, EnergyTransformer
from .fields.hopfield import HopfieldMLP
from .hf import from_pretrained
from .hooks import Trajectory, hooks, run_with_trajectory
from .integrators import (
    INTEGRATORS,
    ButcherTableau,
    ExplicitEuler,
    ExplicitRungeKutta,
    Heun,
    Integrator,
    Leapfrog,
    LieTrotter,
    MacaronSplitting,
    Midpoint,
    Momentum,
    PositionVerlet,
    RungeKutta4,
    StrangSplitting,
    SymplecticEuler,
    get_integrator,
    integrate,
    register,
)
from .model import FlowLM, build_model
from .steering import ConceptBarrier, TokenAvoidance, WordAvoidance
from .train import load_run, train

__version__ = "0.1.0"

__all__ = [
    "DataConfig", "FlowConfig", "ModelConfig", "RunConfig", "TrainConfig",
    "MLP", "CausalSelfAttention", "KVCache", "TransformerField",
    "Trajectory", "hooks", "run_with_trajectory",
    "INTEGRATORS", "ExplicitEuler", "Integrator", "LieTrotter", "get_integrator", "integrate",
    "register", "FlowLM", "build_model", "load_run", "train", "from_pretrained",
    "ButcherTableau", "ExplicitRungeKutta", "Heun", "Leapfrog", "MacaronSplitting", "Midpoint",
    "Momentum", "PositionVerlet", "RungeKutta4", "StrangSplitting", "SymplecticEuler",
    "EnergyAttention", "EnergyLayerNorm", "EnergyTransformer", "HopfieldMLP",
    "ConceptBarrier", "TokenAvoidance", "WordAvoidance",
]
