"""Shell-LCC manifold: parameters, anchor coders, shell head, fitting losses and steps."""

from shelllcc.manifold.coders import amortized_code, analytic_code, data_space_anchors
from shelllcc.manifold.init import calibrate_shell, init_anchors, init_manifold, kmeans, kmeans_plus_plus
from shelllcc.manifold.losses import Stage1Weights, stage1_loss, stage2_loss
from shelllcc.manifold.params import ManifoldConfig, ManifoldParams, check_params, init_params
from shelllcc.manifold.patches import patchify, to_patches, unpatchify

__all__ = [
    "ManifoldConfig", "ManifoldParams", "Stage1Weights", "amortized_code", "analytic_code", "calibrate_shell",
    "check_params", "data_space_anchors", "init_anchors", "init_manifold", "init_params", "kmeans",
    "kmeans_plus_plus", "patchify", "stage1_loss", "stage2_loss", "to_patches", "unpatchify",
]
