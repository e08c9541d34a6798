"""Pure sampling math: sigma grids, SDE/ODE steps with log-probabilities, step plans."""
from megaflow.sampling.dpm import History, data_prediction, dpm_solver_2m_step, flash_grid
from megaflow.sampling.schedule import flow_sigmas, shift_sigmas, timesteps_from_sigmas
from megaflow.sampling.steps import (
    SDE_KINDS,
    STEP_KINDS,
    StepOutput,
    gaussian_log_prob,
    step,
    step_coefficients,
)

__all__ = [
    "History",
    "data_prediction",
    "dpm_solver_2m_step",
    "flash_grid",
    "SDE_KINDS",
    "STEP_KINDS",
    "StepOutput",
    "flow_sigmas",
    "gaussian_log_prob",
    "shift_sigmas",
    "step",
    "step_coefficients",
    "timesteps_from_sigmas",
]
