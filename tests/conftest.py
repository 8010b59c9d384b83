import gc
import os
import warnings

import pytest

from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def quiet_warnings():
    """Silence library warnings (transformers, torch's beta sparse CSR) for a whole module:
    ``pytestmark = pytest.mark.usefixtures("quiet_warnings")``. ``pytest.warns`` still sees them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(autouse=True, scope="session")
def frozen_gc():
    """The converter runs gc.collect() after every layer, which scans every object of the process
    (about 0.6 s once torch and transformers are imported): leave the objects that exist when the
    tests start (modules, their globals) out of it."""
    import torch  # noqa: F401  (imported here so that its objects are frozen too)
    import transformers  # noqa: F401

    gc.freeze()
    yield
    gc.unfreeze()
