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
    """Share the slow tests out between xdist workers, longest module first (a module's slow tests
    stay together: they share module fixtures). xdist's load scheduler starts worker k on
    ``items[k * chunk:(k + 1) * chunk]`` (chunk = n // workers // 4) and hands out the rest on
    demand, so each chunk starts with its share of slow tests and the fast ones fill the gaps.
    Only the order changes; if the shares do not fit, the order stays as collected."""
    workers = getattr(config, "workerinput", {}).get("workercount", 0)
    slow = [item for item in items if item.get_closest_marker("slow")]
    if workers < 2 or not slow:
        return
    rest = [item for item in items if not item.get_closest_marker("slow")]
    modules: dict[str, list] = {}
    for item in slow:
        modules.setdefault(item.module.__name__, []).append(item)

    def seconds(group: list) -> float:
        return sum(item.get_closest_marker("slow").kwargs.get("seconds", 30) for item in group)

    heads: list[list] = [[] for _ in range(workers)]
    for group in sorted(modules.values(), key=seconds, reverse=True):
        lightest = min(range(workers), key=lambda k: seconds(heads[k]))
        heads[lightest] += group
    chunk = max(len(items) // workers // 4, 2)
    if any(len(head) > chunk for head in heads):
        return
    order = []
    for head in heads:
        fill = chunk - len(head)
        order += head + rest[:fill]
        rest = rest[fill:]
    items[:] = order + rest


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
