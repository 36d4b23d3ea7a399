"""Shared test configuration."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: runs torch.compile (slow on a small CPU; deselect with -m 'not compile')"
    )
