"""FF graph -> tensor programs. All FF logic lives here, written once; backends only map primitives."""

from .programs import PROGRAMS, build_program
from .state import init_state, param_specs, state_specs

__all__ = ["PROGRAMS", "build_program", "init_state", "param_specs", "state_specs"]
