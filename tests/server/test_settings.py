"""Config files: both formats, the lookup order, ignored keys reported, broken files
stop start-up with the file name and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psik_api_server.settings import ConfigError, Settings, default_data_dir, load_settings, parse_config


def test_embedded_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PSIK_API_CONFIG", raising=False)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    s = load_settings()
    assert s.prefix == tmp_path / "psik_api" / "jobs"
    # The server's own files: in its state directory, one per prefix (statedir.py).
    assert s.state_directory.parent == tmp_path / "state" / "psik_api"
    assert s.state_directory.name.startswith("jobs-")
    assert s.database_path == s.state_directory / "index.sqlite"
    assert s.token_key_path == s.state_directory / "token-key.pem"
    assert s.launcher_log_path == s.state_directory / "launcher.log"
    assert (s.host, s.port, s.authz) == ("127.0.0.1", 8000, "local")
    assert list(s.backends) == ["default"] and s.backends["default"].type == "local"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "psik_api"


def test_seed_readme_formats() -> None:
    s = parse_config({"backends": {"default": {"prefix": "/tmp/psik_jobs", "backend": {"type": "local"}}}})
    assert s.prefix == Path("/tmp/psik_jobs") and s.backends["default"].type == "local"
    assert s.notes == []
    s = parse_config(
        {
            "backends": {
                "default": {
                    "prefix": "/ccs/proj/prj123/uname/frontier",
                    "psik_path": "/ccs/proj/prj123/uname/frontier/bin/psik",
                    "rc_path": "/ccs/proj/prj123/uname/frontier/bin/rc",
                    "backend": {
                        "type": "slurm",
                        "project_name": "prj123",
                        "attributes": {"--gpu-bind": "closest"},
                    },
                }
            }
        }
    )
    assert s.backends["default"].project_name == "prj123"
    assert s.backends["default"].attributes == {"--gpu-bind": "closest"}
    assert any("psik_path" in n for n in s.notes) and any("rc_path" in n for n in s.notes)
    line = s.notes_line()
    assert line is not None and "\n" not in line and "psik_path" in line and "rc_path" in line


def test_the_seed_readme_s_misspelt_sbatch_option_stops_start_up_saying_how_to_write_it() -> None:
    # sbatch refuses "---gpu-bind": every job of that backend would have failed.
    seed = {"prefix": "/tmp/j", "backend": {"type": "slurm", "attributes": {"---gpu-bind": "closest"}}}
    with pytest.raises(ValueError, match="'---gpu-bind' is not an sbatch option: write it '--gpu-bind'"):
        parse_config({"backends": {"default": seed}})


def test_psik3_flat_format_and_unknown_keys() -> None:
    s = parse_config({"prefix": "/data/jobs", "backends": {"cpu": {"type": "local"}}, "colour": "blue"})
    assert s.prefix == Path("/data/jobs") and list(s.backends) == ["cpu"]
    assert s.notes == ["colour unknown, ignored"]


def test_seed_format_with_two_prefixes_is_refused() -> None:
    with pytest.raises(ValueError, match="one prefix"):
        parse_config(
            {
                "backends": {
                    "a": {"prefix": "/x", "backend": {"type": "local"}},
                    "b": {"prefix": "/y", "backend": {"type": "local"}},
                }
            }
        )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        (json.dumps({"backends": {"d": {"type": "local", "queue": "x"}}}), "backends.d.queue"),
        (json.dumps({"authz": "none"}), "authz"),
        (json.dumps({"port": "eighty"}), "port"),
    ],
)
def test_broken_files_name_the_file_and_reason(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "psik_api.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value) and why in str(err.value)


def test_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "etc").mkdir(parents=True)
    (venv / "etc" / "psik_api.json").write_text(json.dumps({"prefix": "/from/venv"}))
    env_cfg = tmp_path / "env.json"
    env_cfg.write_text(json.dumps({"prefix": "/from/env"}))
    arg_cfg = tmp_path / "arg.json"
    arg_cfg.write_text(json.dumps({"prefix": "/from/arg"}))
    monkeypatch.setenv("VIRTUAL_ENV", str(venv))
    monkeypatch.delenv("PSIK_API_CONFIG", raising=False)
    assert load_settings().prefix == Path("/from/venv")
    monkeypatch.setenv("PSIK_API_CONFIG", str(env_cfg))
    assert load_settings().prefix == Path("/from/env")
    assert load_settings(arg_cfg).prefix == Path("/from/arg")
    monkeypatch.setenv("PSIK_API_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


def test_prefix_and_database_expand_the_home_directory() -> None:
    s = Settings(prefix=Path("~/jobs"), database=Path("~/index.sqlite"))
    assert (s.prefix, s.database) == (Path.home() / "jobs", Path.home() / "index.sqlite")
