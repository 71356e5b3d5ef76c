"""Session-wide tiny assets for the end-to-end tests (built once, loaded by path in every run)."""
from __future__ import annotations

import pytest

from tiny_assets import make_tiny_assets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny-assets"))
