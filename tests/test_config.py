"""Settings: precedence, parsing, errors that name the variable, secrets masked."""
import pytest

from embed_helpers.config import Settings, load_settings, replace_settings
from embed_helpers.constants import PROJECT_ROOT
from embed_helpers.errors import ConfigError

KEY = "sk-test-abcdefghijklmnopqrstuvwxyz123456"


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
])
def test_bad_value_names_the_variable_and_what_is_allowed(tmp_path, name, value, allowed):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, environ={name: value})
    assert err.value.variable == name
    assert str(err.value).startswith(f"{name}:")
    assert allowed in str(err.value)


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


def test_openai_without_key_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        load(tmp_path, environ={"EMBEDDING_BACKEND": "llm_api"})
    # a local vLLM/TEI server needs no key
    s = load(tmp_path, environ={"EMBEDDING_BACKEND": "llm_api",
                                "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1/"})
    assert s.OPENAI_BASE_URL == "http://127.0.0.1:8000/v1"


def test_relative_cache_path_is_from_project_root_not_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load(tmp_path, environ={"EMBED_CACHE_PATH": "cache/e.jsonl"})
    assert s.EMBED_CACHE_PATH == PROJECT_ROOT / "cache" / "e.jsonl"
    assert s.EMBED_CACHE_PATH.is_absolute()


def test_settings_are_frozen_and_replace_parses(tmp_path):
    s = load(tmp_path)
    with pytest.raises(Exception):
        s.EMBED_BATCH_SIZE = 3
    assert replace_settings(s, EMBED_BATCH_SIZE="128").EMBED_BATCH_SIZE == 128
    with pytest.raises(ConfigError, match="EMBED_BATCH_SIZE"):
        replace_settings(s, EMBED_BATCH_SIZE="abc")


def test_model_follows_backend(tmp_path):
    assert load(tmp_path, environ={"EMBEDDING_BACKEND": "ollama"}).model == "nomic-embed-text"
    assert isinstance(load(tmp_path), Settings)


def test_env_example_documents_every_setting():
    import re
    from embed_helpers.config import SPEC
    names = re.findall(r"^([A-Z_]+)=", (PROJECT_ROOT / ".env.example").read_text(), re.M)
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
