"""Fixtures for pipeline tests: corpora built in-process from real images, and a tiny tokenizer."""

from __future__ import annotations

import pytest
from pipeline_helpers import Corpus, build_bad_corpus, build_fashion_corpus


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory, real_images, animated_gif_path) -> Corpus:
    return build_bad_corpus(tmp_path_factory.mktemp("bad_corpus"), real_images, animated_gif_path)


@pytest.fixture(scope="session")
def fashion_corpus(tmp_path_factory) -> Corpus:
    """600 real Fashion-MNIST images in 6 shards."""
    return build_fashion_corpus(tmp_path_factory.mktemp("fashion"), num=600, per_shard=100)
