import os
import tempfile

# Tests run on the CPU in fp32; 8 simulated devices exercise sharding.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# One persistent XLA cache for the session's processes and the trainer runs they start: a
# program compiled once (the same tiny step in several tests or launches) is loaded after.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"sdxl_jax_tests_xla_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Slow tests first: with ``-n 2`` the long runs start early and share out between the two
    workers instead of one of them finishing the suite alone (longest-first scheduling)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Tiny random SDXL base and refiner saved by diffusers: (base_dir, refiner_dir)."""
    from tests.diffusion.tiny_pipelines import build_both

    return build_both(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """``gs://BUCKET`` on a local GCS server (tests/gcs.py); this process and the processes it
    starts reach it through the real gs:// clients."""
    from tests import gcs

    proc, env = gcs.start(tmp_path_factory.mktemp("gcs") / "server.log")
    old = gcs.set_environ(env)
    try:
        yield f"gs://{gcs.BUCKET}"
    finally:
        gcs.restore_environ(old)
        gcs.stop(proc)
