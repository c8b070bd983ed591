"""The tiny learnable data set shared by the training tests."""

import pytest

from tests.training.test_train_export import write_quadrant_idx


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory):
    """Quadrant images in IDX form: 600 train and 200 test images of 4 classes, learnt in a few epochs."""
    return write_quadrant_idx(tmp_path_factory.mktemp("idx"))
