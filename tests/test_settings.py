"""Settings: one typed object from CT_TRIAGE_* variables (and an optional TOML file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ct_triage.errors import ConfigError
from ct_triage.settings import Settings, parse_destination

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_DOC = ROOT / "docs" / "settings.md"


def test_defaults_need_no_servers():
    settings = Settings.from_env({})
    assert settings.embedded_queue
    assert settings.effective_database_url == "sqlite:///var/ct-triage.sqlite"
    assert settings.effective_storage_dir == Path("var/storage")
    assert (settings.ae_title, settings.port, settings.stable_age_s) == ("CTTRIAGE", 11112, 15.0)


def test_environment_values_are_typed():
    settings = Settings.from_env({
        "CT_TRIAGE_PORT": "104", "CT_TRIAGE_STABLE_AGE_S": "2.5", "CT_TRIAGE_TLS_REQUIRED": "yes",
        "CT_TRIAGE_TLS_CERT": "/etc/c.pem", "CT_TRIAGE_TLS_KEY": "/etc/k.pem",
        "CT_TRIAGE_ALLOWED_CALLING_AES": "CT1, CT2@10.0.0.5", "CT_TRIAGE_DESTINATIONS": "PACS@pacs:104+tls"})
    assert settings.port == 104 and settings.stable_age_s == 2.5 and settings.tls_required is True
    assert settings.tls_cert == Path("/etc/c.pem")
    assert settings.allowed_calling_aes == ["CT1", "CT2@10.0.0.5"]
    destination = parse_destination(settings.destinations[0])
    assert (destination.ae_title, destination.host, destination.port, destination.tls) == ("PACS", "pacs", 104, True)


@pytest.mark.parametrize("env, named", [
    ({"CT_TRIAGE_PORT": "eleven"}, "CT_TRIAGE_PORT"),
    ({"CT_TRIAGE_PORT": "70000"}, "CT_TRIAGE_PORT"),
    ({"CT_TRIAGE_TLS_REQUIRED": "maybe"}, "CT_TRIAGE_TLS_REQUIRED"),
    ({"CT_TRIAGE_TLS_REQUIRED": "true"}, "CT_TRIAGE_TLS_REQUIRED"),
    ({"CT_TRIAGE_DESTINATIONS": "PACS@host"}, "CT_TRIAGE_DESTINATIONS"),
    ({"CT_TRIAGE_DEVICE": "tpu"}, "CT_TRIAGE_DEVICE"),
    ({"CT_TRIAGE_AE_TITLE": "A_TITLE_LONGER_THAN_16"}, "CT_TRIAGE_AE_TITLE"),
])
def test_bad_values_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_toml_file_with_environment_override(tmp_path):
    config = tmp_path / "ct-triage.toml"
    config.write_text('port = 4242\nae_title = "FROMFILE"\ndestinations = ["PACS@127.0.0.1:4242"]\n')
    settings = Settings.from_env({"CT_TRIAGE_CONFIG": str(config), "CT_TRIAGE_PORT": "5555"})
    assert settings.port == 5555 and settings.ae_title == "FROMFILE"
    assert settings.destinations == ["PACS@127.0.0.1:4242"]
    config.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        Settings.from_env({"CT_TRIAGE_CONFIG": str(config)})


def test_effective_config_masks_secrets():
    settings = Settings.from_env({"CT_TRIAGE_DATABASE_URL": "postgresql://ct:s3cret@db/ct",
                                  "CT_TRIAGE_BROKER_URL": "redis://:hunter2@redis:6379/0"})
    text = " ".join(settings.effective().values())
    assert "s3cret" not in text and "hunter2" not in text
    assert "postgresql://ct:***@db/ct" in text


def test_the_settings_doc_carries_the_generated_tables():
    from ct_triage.settings import settings_markdown

    doc = SETTINGS_DOC.read_text()
    generated = doc.split("<!-- generated: ct-triage config --markdown -->\n", 1)[1].split("<!-- /generated -->")[0]
    assert generated == settings_markdown(), "docs/settings.md is stale: paste `ct-triage config --markdown` in"


def test_the_settings_doc_documents_every_setting_with_its_default():
    doc = SETTINGS_DOC.read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `CT_TRIAGE_")]
    documented = {row.split("`")[1] for row in rows}
    known = {name for name, _, _ in Settings.documentation()}
    assert not documented - known, f"docs/settings.md names settings the code does not have: {documented - known}"
    for name, default, _ in Settings.documentation():
        row = next((line for line in rows if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"{name} missing from the settings table of docs/settings.md"
        if default:
            assert f"`{default}`" in row, f"{name}: docs/settings.md default differs from the code's {default!r}"


def test_readme_and_docs_links_resolve():
    """Every relative link of the README and docs/*.md names a file that exists."""
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


def test_start_logs_the_changed_settings_as_a_readable_block_and_every_one_at_debug():
    import io
    import logging

    from ct_triage.runtime import log_effective_config
    from ct_triage.text import OneLineLogFilter

    settings = Settings.from_env({"CT_TRIAGE_DATABASE_URL": "postgresql://ct:s3cret@db/ct", "CT_TRIAGE_PORT": "11113",
                                  "CT_TRIAGE_HTTP_TOKEN": "0123456789abcdef-token",
                                  "CT_TRIAGE_UPS_WORKLIST_LABEL": "ward\n2026-01-01 ERROR forged line"})
    logger = logging.getLogger("ct_triage")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(OneLineLogFilter())
    old_level = logger.level
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.INFO)
        log_effective_config(settings, "serve")
        info = stream.getvalue()
        stream.truncate(0)
        stream.seek(0)
        logger.setLevel(logging.DEBUG)
        log_effective_config(settings, "serve")
        debug = stream.getvalue()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = info.splitlines()
    assert lines[0].startswith("INFO ct_triage: ct-triage serve starting with 4 setting(s) changed from the defaults")
    assert all(line.startswith("    ") for line in lines[1:])  # no line passes for a record of its own
    body = {line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip() for line in lines[1:]}
    assert body == {"database_url": "postgresql://ct:***@db/ct", "port": "11113", "http_token": "***",
                    "ups_worklist_label": "ward\\x0a2026-01-01 ERROR forged line",
                    "effective_storage_dir": "var/storage"}
    assert "s3cret" not in info + debug and "0123456789abcdef" not in info + debug
    assert debug.startswith("DEBUG ct_triage: ct-triage serve starting with every setting:\n")
    assert len(debug.splitlines()) == 1 + len(settings.effective()) and "    ae_title" in debug
