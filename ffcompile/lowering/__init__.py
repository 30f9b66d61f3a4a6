"""FF graph -> tensor programs. All FF logic lives here, written once; backends only map primitives."""

from ..core.family import READOUT_PROGRAMS, bundle_programs, is_train_program, readouts_of, train_programs
from .families import build_program, build_stage_program, negative_probs_program
from .feedforward import owns_readout, pipeline_stages, runs_neutral_pass, stage_params, stage_state
from .state import init_state, param_specs, state_specs

__all__ = ["READOUT_PROGRAMS", "build_program", "build_stage_program", "bundle_programs", "init_state", "is_train_program",
           "negative_probs_program", "owns_readout", "param_specs", "pipeline_stages", "readouts_of", "runs_neutral_pass", "stage_params",
           "stage_state", "state_specs", "train_programs"]
