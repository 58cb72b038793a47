import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
# `HYPOTHESIS_PROFILE=stress pytest ...` searches far more examples (minutes, not seconds).
settings.register_profile(
    "stress", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module", params=["python checks", "native checks"])
def checks_mode(request):
    """Runs a module's tests twice: with the step cache's checks in Python, and in C++
    (adamkit/backends/cpu/checks.cpp, used for plans of any size here), which must take
    the same decisions. Module-scoped, so hypothesis tests can use it."""
    from adamkit.backends.cpu import library, native_checks

    saved = native_checks._lib, native_checks._state, native_checks.MANY_TENSORS
    setting = os.environ.pop("ADAMKIT_NATIVE_CHECKS", None)  # =0 would turn "native" into Python
    if request.param == "native checks":
        if library.compiler_path() is None:
            pytest.skip("no C++ compiler to build checks.cpp")
        native_checks.load_now()  # a failed build fails the tests: CI has a compiler
        native_checks.MANY_TENSORS = 0
    else:
        native_checks._lib, native_checks._state = None, "off"
    yield request.param
    native_checks._lib, native_checks._state, native_checks.MANY_TENSORS = saved
    if setting is not None:
        os.environ["ADAMKIT_NATIVE_CHECKS"] = setting
