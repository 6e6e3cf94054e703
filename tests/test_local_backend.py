"""The offline default: the bundled all-MiniLM-L6-v2 through sentence-transformers."""
import subprocess
import sys

import numpy as np
import pytest

from embed_helpers.backends import REGISTRY, get_backend
from embed_helpers.backends.local import bundled_model_path
from embed_helpers.errors import ConfigError
from embed_helpers.tokens import TokenizerCount


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


def test_window_is_254_exact_tokens_from_max_seq_length_256(local):
    window = local.window
    assert window.max_tokens == 254  # 256 less [CLS] and [SEP]
    assert window.exact is True and isinstance(window.counter, TokenizerCount)
    assert "max_seq_length 256" in window.source and window.request_tokens is None
    assert window.counter.specials() == 2
    # exact: a text the window says is 254 tokens is 256 for the model, no more
    text = " ".join(["word"] * 254)
    assert window.counter.count([text, ""]) == [254, 0]
    from tokenizers import Tokenizer
    model = Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))
    model.no_truncation()
    assert len(model.encode(text).ids) == 256


def test_max_input_tokens_may_lower_the_window_not_raise_it(make_settings):
    assert get_backend(make_settings(EMBED_MAX_INPUT_TOKENS=100)).window.max_tokens == 100
    high = get_backend(make_settings(EMBED_MAX_INPUT_TOKENS=1000)).window
    assert high.max_tokens == 254 and "max_seq_length" in high.source


def test_counting_tokens_does_not_import_torch():
    code = ("import sys, embed_helpers as eh; "
            "s = eh.load_settings(environ={}, env_file='/none'); "
            "w = eh.get_backend(s).window; "
            "assert w.counter.count(['Penicillin allergy', 'a b c']) == [5, 3], "
            "w.counter.count(['Penicillin allergy', 'a b c']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
