"""Shared pytest setup: the `root` marker and a throw-away netns lab."""

import os
import random
import string
import sys

import pytest

# Make `import tracer` work under plain `pytest` too, not only `python -m pytest`.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

IS_ROOT = os.geteuid() == 0


def pytest_configure(config):
    config.addinivalue_line("markers", "root: needs root (CAP_NET_ADMIN) to create network namespaces")


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def unique_lab_args():
    """A prefix no other lab uses and a net_id away from the default 71."""
    from tracer.lab import DEFAULT_NET_ID, NET_ID_RANGE

    prefix = "t" + "".join(random.choices(string.ascii_lowercase, k=4))
    net_id = random.choice([n for n in NET_ID_RANGE if n != DEFAULT_NET_ID])
    return prefix, net_id


def _lab_fixture():
    if not IS_ROOT:
        pytest.skip("needs root: creates network namespaces")
    from tracer.lab import Lab

    made = []

    def make(rules=True):
        new = Lab(*unique_lab_args())
        made.append(new)  # before up(): a half-built lab is cleaned too
        new.up(rules=rules)
        return new

    try:
        yield make
    finally:
        for each in made:
            each.down()


@pytest.fixture(scope="module")
def lab():
    """A lab that is up (with the demo rules) for a whole test module."""
    gen = _lab_fixture()
    make = next(gen)
    try:
        yield make()
    finally:
        gen.close()


@pytest.fixture
def make_lab():
    """Factory for extra labs; every lab it made is torn down afterwards."""
    yield from _lab_fixture()
