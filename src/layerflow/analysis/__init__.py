"""Reading the flow: trajectories, dynamics metrics and an analysis report."""

from .geometry import (
    attention_entropy,
    attention_probs,
    capture_attention,
    effective_rank,
    entropy_per_head,
    geometry_curves,
    interaction_energy,
    mean_pairwise_cosine,
    n_clusters,
    rank_one_residual,
)
from .invariants import energy_along, energy_drift, energy_from_trajectory, linear_invariants
from .jacobian import full_states, lyapunov_spectrum, step_singular_values
from .lens import decode, logit_lens
from .trajectory import (
    collect,
    flow_from,
    increment_norms,
    layer_times,
    pca_paths,
    state_norms,
    states,
    velocities,
)

__all__ = [
    "attention_entropy", "attention_probs", "capture_attention", "effective_rank",
    "entropy_per_head", "geometry_curves", "interaction_energy", "mean_pairwise_cosine",
    "n_clusters", "rank_one_residual", "energy_along", "energy_drift", "energy_from_trajectory",
    "linear_invariants",
    "full_states", "lyapunov_spectrum", "step_singular_values", "decode", "logit_lens",
    "collect", "flow_from", "increment_norms", "layer_times", "pca_paths", "state_norms",
    "states", "velocities",
]
