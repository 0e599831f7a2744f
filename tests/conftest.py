import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds and exports models; a few seconds to minutes")
