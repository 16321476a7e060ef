import pytest

from tests.train.runs import make_parts


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Frozen text encoders, a random tiny VAE, a prepared dataset, a compilation cache: shared
    by every test that runs the trainer."""
    return make_parts(tmp_path_factory.mktemp("parts"))
