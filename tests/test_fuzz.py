"""Fuzzing in CI, bounded: hypothesis draws case seeds for tests/fuzzing.py's four case makers
(model specs, bundle manifests, CLI arguments, .npy inputs); every case must end in success or a
clean one-line error, never a traceback or a hang, and write nothing outside its output folder.
Longer runs: ``python tests/fuzzing.py --cases 500 --out fuzz.json``."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing as fuzz  # tests/fuzzing.py (tests/ is on sys.path via its conftest)

# "cli" cases may train or build the tiny model for a second or two: fewer of them.
EXAMPLES = {"spec": 25, "manifest": 15, "npy": 15, "cli": 8}


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_fuzz_cases_end_cleanly(target, tiny_bundle):
    fuzzer = fuzz.Fuzzer(tiny_bundle, timeout=20.0)

    @settings(max_examples=EXAMPLES[target], deadline=25_000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(min_value=0, max_value=2**31))
    def case(seed):
        result = fuzzer.run(target, seed)
        assert result["outcome"] in ("ok", "clean_error"), result

    case()
