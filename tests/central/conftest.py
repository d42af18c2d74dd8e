"""Fixtures for the central recorder's tests: a real PostgreSQL cluster and a real recorder (two
worker processes on one port) in the lab's server host."""

from __future__ import annotations

import pytest
from central_kit import join

from lab.central import Central


@pytest.fixture(scope="module")
def recorder(lab):
    with Central(lab.b, workers=2) as rec:
        yield rec


@pytest.fixture
def joined(recorder, tmp_path):
    """joined(name) → a freshly joined host (central_kit.Joined)."""
    return lambda name="agent-host": join(recorder, tmp_path, name)
