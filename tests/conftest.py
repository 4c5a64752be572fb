"""Session fixtures: real upstream registries (one per auth mode) and the test images."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.images import (
    Image,
    Pushed,
    RandomLayer,
    build_image,
    build_index,
    push,
    random_layer,
)
from tests.support.registry import Registry, start_registry

TEST_TAG = "v1"


def _registry(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp(f"registry-{mode}"), mode)
    yield registry
    registry.close()


@pytest.fixture(scope="session")
def registry_none(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry:2 upstream without auth."""
    yield from _registry(tmp_path_factory, "none")


@pytest.fixture(scope="session")
def registry_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry:2 upstream with htpasswd (Basic) auth; `username` may pull and push."""
    yield from _registry(tmp_path_factory, "htpasswd")


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry:2 upstream with Docker Hub style bearer tokens (see `.token_server`)."""
    yield from _registry(tmp_path_factory, "token")


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    """Images built once: "small" (1 layer), "multi" (3 layers, one 4 MiB), "multiarch"."""
    root = tmp_path_factory.mktemp("images")
    return {
        "small": build_image(root / "small", TEST_TAG, [random_layer(2048, seed=1)]),
        "multi": build_image(
            root / "multi",
            TEST_TAG,
            [random_layer(1024, seed=2), RandomLayer(4 << 20, seed=3), random_layer(8192, seed=4)],
        ),
        "multiarch": build_index(
            root / "multiarch", TEST_TAG, [("linux", "amd64"), ("linux", "arm64")], seed=10
        ),
    }


@pytest.fixture(scope="session")
def push_all(test_images: dict[str, Image]) -> Callable[[Registry], dict[str, Pushed]]:
    """A function pushing every test image to a registry as test/<name>:v1."""

    def push_to(registry: Registry) -> dict[str, Pushed]:
        return {
            name: push(image, registry, f"test/{name}", TEST_TAG)
            for name, image in test_images.items()
        }

    return push_to
