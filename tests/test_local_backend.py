"""The offline default: the bundled all-MiniLM-L6-v2 through sentence-transformers."""
import subprocess
import sys

import numpy as np
import pytest

from embed_helpers.backends import REGISTRY, get_backend
from embed_helpers.errors import ConfigError


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from embed_helpers.config import load_settings
    settings = load_settings(env_file=tmp_path_factory.mktemp("env") / "none", environ={})
    with get_backend(settings) as backend:
        yield backend


def test_dimension_384_normalized_and_deterministic(local):
    texts = ["Type 2 diabetes mellitus with chronic kidney disease", "Penicillin allergy"]
    first, second = local.embed_batch(texts), local.embed_batch(texts)
    assert first.shape == (2, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_batched_equals_one_by_one(local):
    texts = ["short", "a much longer clinical text about hypertension and its treatment"]
    batched = local.embed_batch(texts)
    single = np.stack([local.embed_batch([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_similar_texts_are_closer(local):
    a, b, c = local.embed_batch(["heart attack", "myocardial infarction", "tax return deadline"])
    assert a @ b > a @ c


def test_registry_error_lists_valid_names(make_settings):
    from dataclasses import replace
    settings = replace(make_settings(), EMBEDDING_BACKEND="nope")
    with pytest.raises(ConfigError, match="valid: local, ollama, llm_api"):
        get_backend(settings)
    assert set(REGISTRY) == {"local", "ollama", "llm_api"}


def test_http_backends_never_import_torch():
    code = ("import sys, embed_helpers as eh; "
            "s = eh.load_settings(environ={'EMBEDDING_BACKEND': 'ollama'}, env_file='/none'); "
            "eh.get_backend(s); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
