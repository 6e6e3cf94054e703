"""Settings: precedence, parsing, errors that name the variable, secrets masked."""
import dataclasses
import re

import pytest

from embed_helpers.backends import get_backend
from embed_helpers.config import Settings, load_settings, replace_settings
from embed_helpers.constants import PROJECT_ROOT
from embed_helpers.errors import ConfigError

PACKAGE = PROJECT_ROOT / "embed_helpers"

#: A key of the real shape (masking keeps "sk-" and the last four), plainly not a real one.
KEY = "sk-test-" + "0" * 26 + "123456"


def load(tmp_path, environ=None, env_text=None, overrides=None):
    env_file = tmp_path / ".env"
    if env_text is not None:
        env_file.write_text(env_text)
    return load_settings(overrides, env_file=env_file, environ=environ or {})


def test_defaults(tmp_path):
    s = load(tmp_path)
    assert (s.EMBEDDING_BACKEND, s.EMBED_BATCH_SIZE, s.EMBED_MAX_RETRIES) == ("local", 64, 5)
    assert (s.EMBED_BACKOFF_MS, s.EMBED_MAX_CONCURRENCY, s.EMBEDDING_TIMEOUT) == (500, 1, 60.0)
    assert s.EMBEDDING_DIM is None and s.OPENAI_API_KEY is None and s.DATABASE_URL is None
    assert s.OLLAMA_HOST == "http://localhost:11434"
    assert s.OLLAMA_EMBED_MODEL == "nomic-embed-text"
    assert s.EMBED_CACHE_PATH == PROJECT_ROOT / ".cache" / "embeddings.jsonl"
    assert s.EMBED_ENCODING == "base64"  # was "float": changed on purpose in the refactor
    assert (s.EMBED_ENGINE, s.EMBED_LONG_TEXTS, s.EMBED_CHUNK_OVERLAP) == ("local", "chunk", 32)
    assert (s.EMBED_CACHE_BACKEND, s.EMBED_INDEX) == ("jsonl", "auto")
    assert s.EMBED_MAX_INPUT_TOKENS is None and s.EMBED_MAX_TOKENS_PER_REQUEST is None
    assert s.EMBED_WORKERS is None and s.EMBED_CACHE_URL is None and s.RAY_ADDRESS is None


def test_precedence_override_beats_environment_beats_dotenv(tmp_path):
    env_text = "EMBED_BATCH_SIZE=8\nEMBED_MAX_RETRIES=2\nEMBED_BACKOFF_MS=7\n"
    s = load(tmp_path, environ={"EMBED_BATCH_SIZE": "16", "EMBED_MAX_RETRIES": "3"},
             env_text=env_text, overrides={"EMBED_BATCH_SIZE": 32})
    assert (s.EMBED_BATCH_SIZE, s.EMBED_MAX_RETRIES, s.EMBED_BACKOFF_MS) == (32, 3, 7)


def test_overrides_ignore_none_and_unknown_names(tmp_path):
    notebook_globals = {"EMBED_BATCH_SIZE": None, "DATA_PATH": "x.csv", "In": [], "json": object()}
    s = load(tmp_path, environ={"EMBED_BATCH_SIZE": "12"}, overrides=notebook_globals)
    assert s.EMBED_BATCH_SIZE == 12


@pytest.mark.parametrize("name, value, allowed", [
    ("EMBED_BATCH_SIZE", "abc", "whole number >= 1"),
    ("EMBED_BATCH_SIZE", "0", "whole number >= 1"),
    ("EMBED_MAX_RETRIES", "-1", "whole number >= 0"),
    ("EMBED_MAX_CONCURRENCY", "1.5", "whole number"),
    ("EMBEDDING_TIMEOUT", "nan", "finite number"),
    ("EMBEDDING_TIMEOUT", "inf", "finite number"),
    ("EMBEDDING_TIMEOUT", "0", "number >= 0.1"),
    ("EMBEDDING_BACKEND", "openai", "local, ollama, llm_api"),
    ("EMBED_ENCODING", "hex", "float, base64"),
    ("OLLAMA_HOST", "localhost:11434", "http(s):// URL"),
    ("EMBED_CACHE_ONLY", "maybe", "true/false"),
    ("EMBEDDING_DIM", "-3", "whole number >= 1"),
    ("GPU_HOURLY_USD", "three", "number"),
    ("EMBED_ENGINE", "spark", "local, ray"),
    ("EMBED_LONG_TEXTS", "cut", "chunk, truncate, fail"),
    ("EMBED_CHUNK_OVERLAP", "-1", "whole number >= 0"),
    ("EMBED_CHUNK_OVERLAP", "some", "whole number >= 0"),
    ("EMBED_MAX_INPUT_TOKENS", "0", "whole number >= 1"),
    ("EMBED_MAX_TOKENS_PER_REQUEST", "-5", "whole number >= 0"),
    ("EMBED_MAX_TOKENS_PER_REQUEST", "lots", "whole number >= 0"),
    ("EMBED_CACHE_BACKEND", "redis", "jsonl, postgres"),
    ("EMBED_INDEX", "sometimes", "auto, always, never"),
    ("EMBED_WORKERS", "0", "whole number >= 1"),
    ("OPENAI_BASE_URL", "http://a:1/v1,ftp://b/v1", "ftp://b/v1"),
    ("OLLAMA_HOST", " , ", "one or more http(s):// URLs"),
])
def test_bad_value_names_the_variable_and_what_is_allowed(tmp_path, name, value, allowed):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, environ={name: value})
    assert err.value.variable == name
    assert str(err.value).startswith(f"{name}:")
    assert allowed in str(err.value)


@pytest.mark.parametrize("name, raw, parsed", [
    ("EMBED_ENGINE", "Ray", "ray"),
    ("EMBED_LONG_TEXTS", "TRUNCATE", "truncate"),
    ("EMBED_LONG_TEXTS", "fail", "fail"),
    ("EMBED_CHUNK_OVERLAP", "0", 0),
    ("EMBED_MAX_INPUT_TOKENS", "200", 200),
    ("EMBED_MAX_TOKENS_PER_REQUEST", "0", 0),  # 0 = no limit
    ("EMBED_MAX_TOKENS_PER_REQUEST", "300000", 300000),
    ("EMBED_MAX_TOKENS_PER_REQUEST", "", None),
    ("EMBED_CACHE_BACKEND", "postgres", "postgres"),
    ("EMBED_INDEX", "never", "never"),
    ("EMBED_INDEX", "ALWAYS", "always"),
    ("EMBED_WORKERS", "4", 4),
    ("EMBED_WORKERS", "", None),
    ("RAY_ADDRESS", "ray://head:10001", "ray://head:10001"),
    ("OLLAMA_HOST", "http://a:1, http://b:2", "http://a:1,http://b:2"),
    ("OPENAI_BASE_URL", " http://a:1/v1/ ,http://b:2/v1", "http://a:1/v1,http://b:2/v1"),
])
def test_new_settings_parse(tmp_path, name, raw, parsed):
    assert getattr(load(tmp_path, environ={name: raw}), name) == parsed


def test_a_bad_server_in_a_list_is_named_alone(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, environ={"OLLAMA_HOST": "http://a:1, b:2"})
    assert err.value.variable == "OLLAMA_HOST"
    assert "b:2" in str(err.value) and "http://a:1" not in str(err.value)


def test_bad_value_in_dotenv_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"EMBED_BATCH_SIZE.*\.env"):
        load(tmp_path, env_text="EMBED_BATCH_SIZE=abc\n")


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("YES", True),
                                           ("0", False), ("off", False), ("", False)])
def test_booleans(tmp_path, raw, expected):
    assert load(tmp_path, environ={"EMBED_CACHE_ONLY": raw}).EMBED_CACHE_ONLY is expected


def test_empty_optional_values_mean_unset(tmp_path):
    empty = ["EMBEDDING_DIM", "OPENAI_API_KEY", "GPU_HOURLY_USD"]
    s = load(tmp_path, env_text="".join(f"{name}=\n" for name in empty))
    assert s.EMBEDDING_DIM is None and s.OPENAI_API_KEY is None and s.GPU_HOURLY_USD is None


def test_secrets_masked_everywhere(tmp_path):
    s = load(tmp_path, environ={"OPENAI_API_KEY": KEY,
                                "DATABASE_URL": "postgresql://u:hunter2secret@db/x"})
    assert s.OPENAI_API_KEY == KEY  # the real value is there for the request
    for text in (repr(s), str(s), str(s.describe()), repr(s.OPENAI_API_KEY)):
        assert KEY not in text and "hunter2secret" not in text
    shown = dict(s.describe())
    assert shown["OPENAI_API_KEY"] == "sk-…3456"
    assert shown["DATABASE_URL"] == "postgresql://u:****@db/x"


def test_cache_url_masked_like_database_url(tmp_path):
    s = load(tmp_path, environ={"EMBED_CACHE_URL": "postgresql://c:cachepass99@cachehost/e",
                                "EMBED_CACHE_BACKEND": "postgres"})
    assert s.EMBED_CACHE_URL == "postgresql://c:cachepass99@cachehost/e"
    for text in (repr(s), str(s), str(s.describe()), repr(s.EMBED_CACHE_URL)):
        assert "cachepass99" not in text
    assert dict(s.describe())["EMBED_CACHE_URL"] == "postgresql://c:****@cachehost/e"


def test_describe_shows_project_paths_relative(tmp_path):
    s = load(tmp_path)
    shown = dict(s.describe())
    assert shown["EMBED_CACHE_PATH"] == ".cache/embeddings.jsonl"
    assert (shown["EMBED_PGDATA"], shown["EMBED_RUNS_DIR"]) == (".pgdata", "runs")
    for text in (str(s.describe()), repr(s)):
        assert str(PROJECT_ROOT) not in text
    assert not [v for v in shown.values() if v.startswith("/")]  # no path of this machine
    # a path outside the project stays absolute: it is the user's own
    outside = load(tmp_path, environ={"EMBED_CACHE_PATH": str(tmp_path / "c.jsonl")})
    assert dict(outside.describe())["EMBED_CACHE_PATH"] == str(tmp_path / "c.jsonl")


def test_openai_without_key_fails_at_the_backend_not_at_load(tmp_path):
    # moved on purpose: load_settings no longer checks the key, the OpenAIBackend does
    s = load(tmp_path, environ={"EMBEDDING_BACKEND": "llm_api"})
    assert s.OPENAI_API_KEY is None
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as err:
        get_backend(s)
    assert err.value.variable == "OPENAI_API_KEY" and "api.openai.com" in str(err.value)
    # a local vLLM/TEI server needs no key
    s = load(tmp_path, environ={"EMBEDDING_BACKEND": "llm_api",
                                "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1/"})
    assert s.OPENAI_BASE_URL == "http://127.0.0.1:8000/v1"
    with get_backend(s) as backend:
        assert type(backend).__name__ == "OpenAIBackend"


def test_relative_cache_path_is_from_project_root_not_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load(tmp_path, environ={"EMBED_CACHE_PATH": "cache/e.jsonl"})
    assert s.EMBED_CACHE_PATH == PROJECT_ROOT / "cache" / "e.jsonl"
    assert s.EMBED_CACHE_PATH.is_absolute()


def test_settings_are_frozen_and_replace_parses(tmp_path):
    s = load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.EMBED_BATCH_SIZE = 3
    assert replace_settings(s, EMBED_BATCH_SIZE="128").EMBED_BATCH_SIZE == 128
    with pytest.raises(ConfigError, match="EMBED_BATCH_SIZE"):
        replace_settings(s, EMBED_BATCH_SIZE="abc")


def test_model_follows_backend(tmp_path):
    # Settings.model is gone on purpose: the backend states its model
    assert not hasattr(load(tmp_path), "model")
    with get_backend(load(tmp_path, environ={"EMBEDDING_BACKEND": "ollama"})) as backend:
        assert backend.model == "nomic-embed-text"
    assert get_backend(load(tmp_path)).model == "all-MiniLM-L6-v2"
    assert isinstance(load(tmp_path), Settings)


def test_env_example_documents_every_setting():
    import re
    from embed_helpers.config import SPEC
    names = re.findall(r"^([A-Z][A-Z0-9_]*)=", (PROJECT_ROOT / ".env.example").read_text(), re.M)
    assert set(names) == set(SPEC)


def test_embed_env_file_picks_the_dotenv_and_empty_means_none(tmp_path, monkeypatch):
    other = tmp_path / "other.env"
    other.write_text("EMBED_BATCH_SIZE=9\n")
    monkeypatch.setenv("EMBED_ENV_FILE", str(other))
    assert load_settings(environ={}).EMBED_BATCH_SIZE == 9
    monkeypatch.setenv("EMBED_ENV_FILE", "")
    assert load_settings(environ={}).EMBED_BATCH_SIZE == 64


def test_empty_environment_value_overrides_dotenv(tmp_path):
    s = load(tmp_path, environ={"DATABASE_URL": ""}, env_text="DATABASE_URL=postgresql://prod/x\n")
    assert s.DATABASE_URL is None


def package_sources(exclude=("backends", "registry.py")):
    return {p.relative_to(PROJECT_ROOT).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(PACKAGE.rglob("*.py"))
            if not set(exclude) & set(p.relative_to(PACKAGE).parts)}


@pytest.mark.parametrize("needle", ['"ollama"', '"llm_api"', "'ollama'", "/api/embed", "ollama:"])
def test_only_the_backends_name_a_backend_or_a_route(needle):
    found = [f"{path}:{n}" for path, text in package_sources().items()
             for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert found == [], f"{needle} outside embed_helpers/backends/ and registry.py"


def test_settings_import_no_backend():
    """The layers: settings know the backends' names (registry.py), never their code."""
    text = (PACKAGE / "config.py").read_text()
    assert "from .backends" not in text and "import backends" not in text


def test_cache_keys_are_made_in_identity_only():
    found = {path for path, text in package_sources(exclude=()).items()
             if re.search(r"\bcache_key\(", text)}
    assert found == {"embed_helpers/identity.py"}
