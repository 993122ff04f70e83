"""AppSettings precedence (args > env var > default), bounds, and Secrets from the environment."""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest

from lib.errors import ConfigurationError
from lib.secrets import read_or_create_secret
from lib.settings import (
    DEV_API_KEY_FILE,
    DEV_SECRET_FILE,
    ENV_VARS,
    AppSettings,
    Secrets,
)

KEY_A = "ss_Nf3kW8pQ2xV7mZ1cR5tY9bH4jL6dG0sA_eUi"
KEY_B = "ss_Tq6yE1oP8wK3nM5vB7cX9zJ2hF4gD0aS-rLu"
GOOD_SECRET = "Zq3v-7pLk2_Xw9rTb4nYc8sHd1fMj6gU0aEo5iRt"

# field -> (value given as app arg, env var text, value the env var text parses to)
PRECEDENCE_CASES: dict[str, tuple[Any, str, Any]] = {
    "environment": ("production", "production", "production"),
    "state_dir": ("/from/args", "/from/env", "/from/env"),
    "model_dirs": (["args-models/"], "env-a/, env-b/", ["env-a/", "env-b/"]),
    "model_scan_interval": (2.5, "42", 42.0),
    "default_inference_steps": (7, "12", 12),
    "default_guidance_scale": (3.0, "9.5", 9.5),
    "cors_origins": (["https://args.example"], "https://env.example", ["https://env.example"]),
    "request_timeout_s": (11.0, "99.5", 99.5),
    "generation_threads": (3, "2", 2),
    "allow_pickle_models": (False, "1", True),
    "metrics_per_key": (True, "0", False),
}


def test_every_env_var_has_a_precedence_case() -> None:
    # A field added to ENV_VARS without a case here would go untested.
    assert set(PRECEDENCE_CASES) == set(ENV_VARS)


@pytest.mark.parametrize("field", sorted(ENV_VARS))
def test_env_var_overrides_default(field: str) -> None:
    _, env_text, parsed = PRECEDENCE_CASES[field]
    default = getattr(AppSettings(), field)
    assert parsed != default  # otherwise the test could not tell env from default
    settings = AppSettings.from_args({}, env={ENV_VARS[field]: env_text})
    assert getattr(settings, field) == parsed


@pytest.mark.parametrize("field", sorted(ENV_VARS))
def test_arg_overrides_env_var(field: str) -> None:
    arg, env_text, parsed = PRECEDENCE_CASES[field]
    if field == "environment":  # both sides of a two-value Literal: make them differ
        arg, env_text = "development", "production"
    settings = AppSettings.from_args({field: arg}, env={ENV_VARS[field]: env_text})
    assert getattr(settings, field) == arg
    assert arg != parsed


@pytest.mark.parametrize("field", sorted(ENV_VARS))
def test_default_when_neither_arg_nor_env(field: str) -> None:
    # An empty variable counts as unset, so `MODEL_DIRS=` does not mean "no directories".
    unrelated = {"UNRELATED": "x", ENV_VARS[field]: ""}
    assert getattr(AppSettings.from_args(None, env=unrelated), field) == getattr(AppSettings(), field)


def test_defaults() -> None:
    settings = AppSettings.from_args({}, env={})
    assert settings.environment == "development"
    assert settings.model_dirs == ["ai-models/"]
    assert settings.cors_origins == ["*"]
    assert settings.default_inference_steps == 30
    assert settings.default_guidance_scale == 7.5
    assert settings.state_path == Path(".sealserve")


def test_from_args_reads_os_environ_when_env_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_INFERENCE_STEPS", "17")
    assert AppSettings.from_args({}).default_inference_steps == 17


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        (" a , b ,", ["a", "b"]),
        ("a,,b", ["a", "b"]),
        ("/models/x, /models/y ", ["/models/x", "/models/y"]),
    ],
)
@pytest.mark.parametrize("field", ["model_dirs", "cors_origins"])
def test_csv_fields(field: str, text: str, expected: list[str]) -> None:
    from_env = AppSettings.from_args({}, env={ENV_VARS[field]: text})
    from_arg = AppSettings.from_args({field: text}, env={})
    assert getattr(from_env, field) == expected
    assert getattr(from_arg, field) == expected


def test_list_arg_is_kept_as_is() -> None:
    settings = AppSettings.from_args({"model_dirs": ["a,b"]}, env={})
    assert settings.model_dirs == ["a,b"]


@pytest.mark.parametrize("args", [{"no_such_field": 1}, {"modeldirs": "x"}, {"SECRET_KEY": "x" * 40}])
def test_unknown_args_are_rejected(args: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError, match=next(iter(args))):
        AppSettings.from_args(args, env={})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_scan_interval", 0),
        ("model_scan_interval", -1),
        ("model_scan_interval", 3601),
        ("default_inference_steps", 0),
        ("default_inference_steps", 151),
        ("default_guidance_scale", 0.99),
        ("default_guidance_scale", 20.01),
        ("request_timeout_s", 0),
        ("max_body_bytes", 0),
        ("max_image_pixels", 0),
        ("environment", "staging"),
    ],
)
def test_out_of_bounds_args_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        AppSettings.from_args({field: value}, env={})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_scan_interval", 3600),
        ("default_inference_steps", 1),
        ("default_inference_steps", 150),
        ("default_guidance_scale", 1.0),
        ("default_guidance_scale", 20.0),
    ],
)
def test_bounds_are_inclusive(field: str, value: Any) -> None:
    assert getattr(AppSettings.from_args({field: value}, env={}), field) == value


@pytest.mark.parametrize(
    ("var", "text"),
    [("MODEL_SCAN_INTERVAL", "0"), ("DEFAULT_INFERENCE_STEPS", "151"), ("DEFAULT_GUIDANCE_SCALE", "abc")],
)
def test_out_of_bounds_env_values_are_rejected(var: str, text: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        AppSettings.from_args({}, env={var: text})


def test_settings_are_frozen() -> None:
    settings = AppSettings()
    with pytest.raises(pydantic.ValidationError):
        settings.model_scan_interval = 1.0  # type: ignore[misc]


def test_every_field_has_a_description() -> None:
    missing = [name for name, f in AppSettings.model_fields.items() if not f.description]
    assert missing == []


# --- Secrets ------------------------------------------------------------------------------------


def production(tmp_path: Path) -> AppSettings:
    return AppSettings.from_args({"environment": "production", "state_dir": str(tmp_path / "state")}, env={})


def development(tmp_path: Path) -> AppSettings:
    return AppSettings.from_args({"environment": "development", "state_dir": str(tmp_path / "state")}, env={})


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SECRET_KEY": ""},
        {"SECRET_KEY": "changeme"},
        {"SECRET_KEY": "your-secure-secret-key"},
        {"SECRET_KEY": "  CHANGEME  "},
        {"SECRET_KEY": "x" * 31},
        {"SECRET_KEY": "é" * 15},  # 30 bytes in UTF-8
    ],
    ids=["missing", "empty", "changeme", "example", "padded-upper", "31-bytes", "30-utf8-bytes"],
)
def test_production_refuses_bad_secret(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Secrets.from_env(production(tmp_path), env={**env, "API_KEYS": KEY_A})
    assert "SECRET_KEY" in caught.value.message
    if env.get("SECRET_KEY"):
        assert env["SECRET_KEY"].strip() not in caught.value.message
    # Production never falls back to generating secrets on disk.
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    "env",
    [
        {"SECRET_KEY": "a" * 32, "API_KEYS": KEY_A},
        {"SECRET_KEY": "ab" * 20, "API_KEYS": KEY_A},
        {"SECRET_KEY": "0123456789abcdef" * 2, "API_KEYS": KEY_A},
        {"SECRET_KEY": GOOD_SECRET, "API_KEYS": "b" * 32},
        {"SECRET_KEY": GOOD_SECRET, "API_KEYS": f"{KEY_A},{'xyz' * 12}"},
    ],
    ids=["a*32", "ab*20", "hex-pattern", "api-key-b*32", "patterned-second-key"],
)
def test_production_refuses_secrets_that_are_plainly_not_random(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Secrets.from_env(production(tmp_path), env=env)
    assert ("SECRET_KEY" if "API_KEYS" not in caught.value.message else "API_KEYS") in caught.value.message
    assert env["SECRET_KEY"] not in caught.value.message


def test_production_accepts_32_utf8_bytes(tmp_path: Path) -> None:
    secret = "éàüöZq3v7pLk2Xw9rTb4nYc8sHd1"  # 28 characters, 32 bytes
    secrets = Secrets.from_env(production(tmp_path), env={"SECRET_KEY": secret})
    assert secrets.secret_key.get_secret_value() == secret


def test_production_with_good_key_and_api_keys(tmp_path: Path) -> None:
    key_a, key_b = KEY_A, KEY_B
    secrets = Secrets.from_env(
        production(tmp_path), env={"SECRET_KEY": GOOD_SECRET, "API_KEYS": f" {key_a} ,{key_b},"}
    )
    assert secrets.secret_key.get_secret_value() == GOOD_SECRET
    assert [k.get_secret_value() for k in secrets.api_keys] == [key_a, key_b]
    assert GOOD_SECRET not in repr(secrets) and key_a not in repr(secrets)
    assert not (tmp_path / "state").exists()


def test_production_without_api_keys_has_none(tmp_path: Path) -> None:
    assert Secrets.from_env(production(tmp_path), env={"SECRET_KEY": GOOD_SECRET}).api_keys == ()


def test_from_env_reads_os_environ_when_env_is_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_KEY", GOOD_SECRET)
    monkeypatch.delenv("API_KEYS", raising=False)
    assert Secrets.from_env(production(tmp_path)).secret_key.get_secret_value() == GOOD_SECRET


def test_development_generates_and_persists_secrets(tmp_path: Path) -> None:
    settings = development(tmp_path)
    first = Secrets.from_env(settings, env={})
    state = tmp_path / "state"
    secret_file, key_file = state / DEV_SECRET_FILE, state / DEV_API_KEY_FILE
    for path in (secret_file, key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = first.secret_key.get_secret_value()
    assert len(secret.encode()) >= 32
    assert secret_file.read_text().strip() == secret
    assert [k.get_secret_value() for k in first.api_keys] == [key_file.read_text().strip()]
    assert first.api_keys[0].get_secret_value() != secret

    second = Secrets.from_env(settings, env={})
    assert second.secret_key.get_secret_value() == secret
    assert [k.get_secret_value() for k in second.api_keys] == [k.get_secret_value() for k in first.api_keys]


def test_development_with_secret_key_uses_it_and_adds_dev_key(tmp_path: Path) -> None:
    key = "c" * 40
    secrets = Secrets.from_env(development(tmp_path), env={"SECRET_KEY": GOOD_SECRET, "API_KEYS": key})
    assert secrets.secret_key.get_secret_value() == GOOD_SECRET
    assert not (tmp_path / "state" / DEV_SECRET_FILE).exists()
    dev_key = (tmp_path / "state" / DEV_API_KEY_FILE).read_text().strip()
    assert [k.get_secret_value() for k in secrets.api_keys] == [key, dev_key]


def test_development_state_dirs_are_independent(tmp_path: Path) -> None:
    one = Secrets.from_env(AppSettings(state_dir=str(tmp_path / "one")), env={})
    two = Secrets.from_env(AppSettings(state_dir=str(tmp_path / "two")), env={})
    assert one.secret_key.get_secret_value() != two.secret_key.get_secret_value()


def test_read_or_create_secret_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "secret"
    value = read_or_create_secret(path)
    assert value and path.read_text() == value + "\n"
    assert read_or_create_secret(path) == value


def test_read_or_create_secret_keeps_existing_value(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("preexisting-value\n")
    assert read_or_create_secret(path) == "preexisting-value"


def test_read_or_create_secret_concurrent_callers_agree(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secret"
    callers = 16
    barrier = threading.Barrier(callers)
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            barrier.wait()
            value = read_or_create_secret(path)
        except BaseException as exc:  # collected and asserted below
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(value)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == callers
    assert len(set(results)) == 1
    assert path.read_text().strip() == results[0]


def test_read_or_create_secret_empty_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    path.write_text("")
    monkeypatch.setattr("lib.secrets.time.sleep", lambda _s: None)  # no real waiting
    with pytest.raises(ConfigurationError, match="empty"):
        read_or_create_secret(path)


@pytest.mark.parametrize("bad_key", ["short-key", "x" * 31, "has.dots." + "x" * 40])
@pytest.mark.parametrize("make_settings", [production, development])
def test_bootstrap_keys_must_be_long_and_dotless(
    tmp_path: Path, bad_key: str, make_settings: Callable[[Path], AppSettings]
) -> None:
    with pytest.raises(ConfigurationError, match="API_KEYS") as caught:
        Secrets.from_env(make_settings(tmp_path), env={"SECRET_KEY": GOOD_SECRET, "API_KEYS": bad_key})
    assert bad_key not in caught.value.message
