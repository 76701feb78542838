"""Shared fixtures: real servers (nginx WebDAV, moto S3, a flaky HTTP server), real Dask
processes, and generated datasets of real tar shards with real JPEGs."""

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
# The real ImageMagick first: /usr/local/bin may hold a slow stand-in on some machines.
os.environ["PATH"] = "/usr/bin:" + os.environ.get("PATH", "")

try:
    from servers import *  # noqa: F401,F403  (nginx_server, s3_server, flaky_http_server)
except ImportError:  # pragma: no cover - written by another module's tests
    pass
try:
    from dask_fixtures import *  # noqa: F401,F403  (dask_cluster)
except ImportError:  # pragma: no cover
    pass

from tarproc import datagen  # noqa: E402


@pytest.fixture(scope="session")
def testdata():
    """The folder of real shards written by other tools (see tests/data/README.md)."""
    return DATA


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    """data/imagenet_train-0000.tgz .. -0007.tgz: 8 shards x 10 ImageNet-like samples (real JPEGs)."""
    d = tmp_path_factory.mktemp("imagenet")
    datagen.write_dataset("imagenet", str(d), shards=8, samples=10, seed=1)
    return d


@pytest.fixture(scope="session")
def uw3_dir(tmp_path_factory):
    """Volume_00.tgz .. Volume_15.tgz (the seeds' Volume_@16.tgz): 16 shards x 10 OCR-like samples."""
    d = tmp_path_factory.mktemp("uw3")
    datagen.write_dataset("uw3", str(d), shards=16, samples=10, seed=2)
    return d


@pytest.fixture(scope="session")
def words_dir(tmp_path_factory):
    """words-0.tar .. words-7.tar (words-@8.tar): 8 shards x 50 text documents."""
    d = tmp_path_factory.mktemp("words")
    datagen.write_dataset("words", str(d), shards=8, samples=50, seed=3)
    return d


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh current directory for command-line tests."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_tree(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return Path(dst)
