"""Rectified flow (Wan convention): noising, training noise levels, losses, samplers, guidance.

``x_s = (1 - s) x0 + s eps``, target ``v = eps - x0``, model timestep ``1000 s``; sampling runs the
ODE ``dx/ds = v`` from ``s = 1`` to 0 on a shifted schedule ``k s / (1 + (k - 1) s)``.
"""

from shelllcc.flow.guidance import guided_velocity
from shelllcc.flow.objectives import (
    flow_dpo_loss,
    flow_dpo_objective,
    flow_rwr_loss,
    flow_rwr_objective,
    noised_data,
    one_step_from_noise,
    sft_loss,
    velocity_errors,
)
from shelllcc.flow.rectified import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    denoise,
    flow_matching_loss,
    model_timestep,
    noise_from_velocity,
    velocity_from_x0,
    velocity_target,
)
from shelllcc.flow.samplers import (
    UniPCCoefficients,
    cfg_velocity,
    euler_sample,
    loss_guidance,
    reward_guidance,
    sample,
    unipc_coefficients,
    unipc_sample,
)
from shelllcc.flow.timesteps import (
    FlowSchedule,
    linear_sampling_schedule,
    logit_normal_sigmas,
    sample_training_sigmas,
    shift_sigmas,
    uniform_sigmas,
    wan_sampling_schedule,
)

__all__ = [
    "flow_dpo_loss", "flow_dpo_objective", "flow_rwr_loss", "flow_rwr_objective", "guided_velocity", "noised_data",
    "one_step_from_noise", "sft_loss", "velocity_errors", "reward_guidance",
    "NUM_TRAIN_TIMESTEPS", "add_noise", "denoise", "flow_matching_loss", "model_timestep",
    "noise_from_velocity", "velocity_from_x0", "velocity_target",
    "UniPCCoefficients", "cfg_velocity", "euler_sample", "loss_guidance", "sample",
    "unipc_coefficients", "unipc_sample",
    "FlowSchedule", "linear_sampling_schedule", "logit_normal_sigmas", "sample_training_sigmas",
    "shift_sigmas", "uniform_sigmas", "wan_sampling_schedule",
]
