"""Shared fixtures: tiny generated models (built once per test session) and hypothesis profiles.

Models are written to a per-session temporary directory: the autouse ``model_dir``
fixture points LLAMA_MTP_MODEL_CACHE (models only, see ``testing.cache_dir``) at it
for the whole session, so every ``testing.cached_test_model`` call, in this process
or in the subprocesses tests start (they inherit the environment), builds there and
never in the user's ~/.cache/llama_mtp/models. LLAMA_MTP_CACHE is left alone: it is
the root of the shim build cache, which must stay where it is (no rebuild).

Hypothesis profiles: ``ci`` (default) and ``long`` (``HYPOTHESIS_PROFILE=long``
for local runs: many more examples and longer state-machine runs).
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _helpers  # noqa: E402

# ------------------------------------------------------------------------- hypothesis

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# ci: pure property tests get 200 examples; the state machine sizes itself from the
# profile name (see test_session_properties.STATE_MACHINE_RUNS).
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(HYPOTHESIS_PROFILE)


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="session", autouse=True)
def model_dir(tmp_path_factory) -> Iterator[pathlib.Path]:
    """The session's model cache: LLAMA_MTP_MODEL_CACHE for the whole test session."""
    directory = tmp_path_factory.mktemp("llama_mtp_models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_helpers.MODEL_CACHE_ENV, str(directory))
        yield directory


@pytest.fixture(scope="session")
def oracle_model(model_dir) -> pathlib.Path:
    """Oracle recipe, every MTP draft correct (accept=1.0)."""
    return _helpers.build_model(_helpers.ORACLE_SPEC, model_dir)


@pytest.fixture(scope="session")
def oracle_half_model(model_dir) -> pathlib.Path:
    """Oracle recipe, accept=0.5 laid out exactly along the cycle ("spread")."""
    return _helpers.build_model(_helpers.ORACLE_HALF_SPEC, model_dir)


@pytest.fixture(scope="session")
def oracle_random_model(model_dir) -> pathlib.Path:
    """Oracle recipe, accept=0.5 drawn iid per token ("random")."""
    return _helpers.build_model(_helpers.ORACLE_RANDOM_SPEC, model_dir)


@pytest.fixture(scope="session")
def context_model(model_dir) -> pathlib.Path:
    """Hybrid (recurrent + attention) trunk whose output depends on history."""
    return _helpers.build_model(_helpers.CONTEXT_SPEC, model_dir)


@pytest.fixture(scope="session")
def context_half_model(model_dir) -> pathlib.Path:
    """The context recipe with iid accept=0.5 MTP drafts: partial rejections roll back recurrent state."""
    return _helpers.build_model(_helpers.CONTEXT_HALF_SPEC, model_dir)


@pytest.fixture(scope="session")
def no_mtp_model(model_dir, oracle_model) -> pathlib.Path:
    """The oracle model rewritten without its MTP block (nextn_predict_layers = 0)."""
    return _helpers.write_model_without_mtp(oracle_model, model_dir / "qwen35-no-mtp.gguf")


@pytest.fixture
def pair(oracle_model):
    """(target, draft) on the accept=1.0 oracle model, closed after the test."""
    target, draft = _helpers.load_pair(oracle_model)
    yield target, draft
    target.close()
    draft.close()


@pytest.fixture
def no_extra_bufts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load models without CPU "extra buffer types" (AMX / repacked weights).

    ggml's AMX q8_0 matmul segfaults for batches of > 1 token on this class of CPU, and the
    repacked q4_K kernels die with SIGILL (also with llama.cpp's own quantizer output;
    ggml-org/llama.cpp#20824).
    """
    import llama_cpp

    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(low, "llama_model_default_params", params)
