"""FF graph -> tensor programs. All FF logic lives here, written once; backends only map primitives."""

from ..core.family import READOUT_PROGRAMS, bundle_programs, is_train_program, readouts_of, train_programs
from .families import build_program, negative_probs_program
from .state import init_state, param_specs, state_specs

__all__ = ["READOUT_PROGRAMS", "build_program", "bundle_programs", "init_state", "is_train_program", "negative_probs_program",
           "param_specs", "readouts_of", "state_specs", "train_programs"]
