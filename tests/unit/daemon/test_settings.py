from __future__ import annotations

from pathlib import Path

import pytest

from corral.daemon.settings import SettingsError, load_settings


def test_flag_beats_env_beats_file(tmp_path: Path) -> None:
    cfg = tmp_path / "corral.toml"
    cfg.write_text('http_port = 9000\ndriver = "fake"\nname = "from-file"\nlease_ttl_s = 20\n')
    env = {"CORRAL_HTTP_PORT": "9100", "CORRAL_NAME": "from-env"}
    s = load_settings({"http_port": 9200, "name": None}, env=env, config=cfg)
    assert s.http_port == 9200
    assert s.name == "from-env"
    assert s.lease_ttl_s == 20


def test_every_setting_has_a_doc_an_env_var_and_a_key(tmp_path: Path) -> None:
    import dataclasses

    from corral.daemon.settings import AgentSettings

    for f in dataclasses.fields(AgentSettings):
        assert f.metadata.get("doc"), f.name
    s = load_settings({}, env={"CORRAL_BOOTSTRAP": "yes", "CORRAL_NAME": "n1"})
    assert s.bootstrap is True


@pytest.mark.parametrize(
    ("flags", "env", "match"),
    [
        ({"http_port": 70000, "name": "n1"}, {}, "--http-port / CORRAL_HTTP_PORT"),
        ({"name": "Bad_Name"}, {}, "must be a DNS label"),
        ({"name": "n1"}, {"CORRAL_LEASE_TTL_S": "soon"}, "CORRAL_LEASE_TTL_S"),
        ({"name": "n1", "labels": "novalue"}, {}, "must look like key=value"),
    ],
)
def test_bad_settings_name_the_flag(
    flags: dict[str, object], env: dict[str, str], match: str
) -> None:
    with pytest.raises(SettingsError, match=match):
        load_settings(flags, env=env)


def test_unknown_config_keys_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("htp_port = 1\n")
    with pytest.raises(SettingsError, match="unknown keys \\['htp_port'\\]"):
        load_settings({"name": "n1"}, env={}, config=cfg)


def test_labels_parse() -> None:
    s = load_settings({"name": "n1", "labels": "zone=a,rack=r1"}, env={})
    assert s.label_dict() == {"zone": "a", "rack": "r1"}


def test_readme_documents_every_setting() -> None:
    import dataclasses

    from corral.daemon.settings import AgentSettings

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for f in dataclasses.fields(AgentSettings):
        assert f"`CORRAL_{f.name.upper()}`" in readme, f"README lacks CORRAL_{f.name.upper()}"
