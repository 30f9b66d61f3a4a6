"""FF graph -> tensor programs. All FF logic lives here, written once; backends only map primitives."""

from .feedforward import PROGRAMS, READOUT_PROGRAMS, build_program, is_train_program, negative_probs_program, readouts_of, train_programs
from .state import init_state, param_specs, state_specs

__all__ = ["PROGRAMS", "READOUT_PROGRAMS", "build_program", "is_train_program", "negative_probs_program", "readouts_of",
           "train_programs", "init_state", "param_specs", "state_specs"]
