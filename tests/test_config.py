from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cptkit.config import Config, load_config, masked_dict
from cptkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_seed_config_keeps_the_seed_values() -> None:
    cfg = load_config(REPO / "configs" / "cpt_config.yaml")
    assert cfg.model.name == "microsoft/phi-3-mini-4k-instruct"
    assert cfg.training.learning_rate == 2.0e-5
    assert cfg.training.num_epochs == 2
    assert cfg.training.max_seq_length == 2048
    assert cfg.data.replay_ratio == 0.2
    assert cfg.data.output_dir == Path("data")


def test_set_overrides_any_key_with_yaml_typed_values(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "training.learning_rate=1e-4",
            "prepare.dedup.near=false",
            "prepare.language.languages=[en, de]",
            "source.type=jsonl",
            "source.path=x.jsonl",
        ],
    )
    assert cfg.training.learning_rate == 1e-4
    assert cfg.prepare.dedup.near is False
    assert cfg.prepare.language.languages == ["en", "de"]
    assert cfg.source is not None and cfg.source.type == "jsonl"


def test_an_unquoted_off_is_the_mode_off(tmp_path: Path) -> None:
    # YAML reads `off` as false: in a file and in --set it still means the mode "off".
    config = tmp_path / "c.yaml"
    config.write_text("evaluate:\n  decontamination:\n    mode: off\n")
    assert load_config(config).evaluate.decontamination.mode == "off"
    assert load_config(None, ["evaluate.decontamination.mode=off"]).evaluate.decontamination.mode == "off"
    with pytest.raises(ConfigError, match=r"decontamination\.mode"):
        load_config(None, ["evaluate.decontamination.mode=true"])


def test_all_errors_are_reported_at_once_with_key_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "training:\n  max_seq_length: -5\n  learning_rate: fast\n"
        "data:\n  replay_ratio: 1.5\n"
        "modle:\n  name: x\n"
        "source:\n  type: jsonl\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    problems = info.value.problems
    joined = "\n".join(problems)
    assert len(problems) == 5, joined
    assert "training.max_seq_length: Input should be greater than 0 (got -5)" in joined
    assert "training.learning_rate:" in joined
    assert "data.replay_ratio:" in joined and "1.5" in joined
    assert "modle: unknown key" in joined
    assert "source.path: required key is missing" in joined


def test_unknown_source_type_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["source.type=mysql", "source.path=x"])
    assert info.value.problems[0].startswith("config error: source:")


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in info.value.problems[0] and "not valid YAML" in info.value.problems[0]


def test_env_file_fills_databricks_settings_and_show_masks_the_token(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / ".env").write_text(
        "DATABRICKS_HOST=https://example.cloud.databricks.com\nDATABRICKS_TOKEN=dapi0123456789abcdef0123456789abcdef\n"
        "DATABRICKS_CATALOG=main\nDATABRICKS_SCHEMA=docs\nDATABRICKS_TABLE=pages\n",
        encoding="utf-8",
    )
    cfg = load_config(None)
    assert cfg.databricks.host == "https://example.cloud.databricks.com"
    assert cfg.databricks.token is not None
    assert cfg.databricks.token.get_secret_value().startswith("dapi")
    assert (cfg.databricks.catalog, cfg.databricks.schema_, cfg.databricks.table) == ("main", "docs", "pages")
    assert masked_dict(cfg)["databricks"]["token"] == "***"

    result = cli("config", "show")
    assert result.exit_code == 0
    assert "dapi0123456789abcdef" not in result.output
    assert "token: '***'" in result.output
    assert "catalog: main" in result.output


def test_yaml_value_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABRICKS_CATALOG", "from_env")
    cfg = load_config(None, ["databricks.catalog=from_yaml"])
    assert cfg.databricks.catalog == "from_yaml"


def test_cli_config_error_exits_2_with_one_line_each_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_seq_length: -1\ndata:\n  replay_ratio: 1.5\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "cptkit", "prepare", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        "config error: training.max_seq_length: Input should be greater than 0 (got -1)",
        "config error: data.replay_ratio: Input should be less than 1 (got 1.5)",
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("model:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 18)"),
        (b"model:\n  name: [unclosed\n", "line 3: not valid YAML (expected ',' or ']', but got '<stream end>')"),
        (b"- a list\n", "the top level must be a mapping of sections"),
    ],
)
def test_an_unusable_config_file_is_one_config_error_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "configs" / "x.yaml"
    path.parent.mkdir()
    path.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "cptkit", "config", "show", "--config", "configs/x.yaml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"config error: configs/x.yaml: {expected}"]


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_an_unreadable_config_or_env_file_is_a_config_error(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    # A file whose read fails (permission bits do not stop root, so: one that reads with an I/O error).
    (tmp_path / "x.yaml").symlink_to("/proc/self/mem")
    result = cli("config", "show", "--config", "x.yaml")
    assert result.exit_code == 2
    assert result.output.strip() == "config error: x.yaml: cannot read (Input/output error)"
    (tmp_path / ".env").write_bytes(b"DATABRICKS_HOST=caf\xe9\n")
    result = cli("config", "show")
    assert result.exit_code == 2
    assert f"config error: {Path.cwd() / '.env'}: not UTF-8 text (byte 0xe9 at offset 19)" in result.output


def test_missing_config_file_is_a_config_error(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("extract", "--config", "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml: config file not found" in result.output


def test_config_without_source_cannot_extract(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("extract")
    assert result.exit_code == 2
    assert "config error: source: required" in result.output


def test_config_reference_doc_is_generated_from_the_schema() -> None:
    from cptkit.config import reference_markdown

    doc = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert doc == reference_markdown(), "regenerate: cptkit config reference > docs/config-reference.md"


def test_errors_show_bad_values_except_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.tokenizer=123", "databricks.token=987654321"])
    joined = "\n".join(info.value.problems)
    assert "model.tokenizer: Input should be a valid string (got 123)" in joined
    assert "databricks.token:" in joined and "987654321" not in joined


def test_the_mistral_config_is_qlora_at_2048_with_the_seed_values() -> None:
    cfg = load_config(REPO / "configs" / "mistral-7b.yaml")
    assert cfg.model.name == "mistralai/Mistral-7B-v0.1"
    assert cfg.training.method == "qlora"
    assert cfg.training.max_seq_length == 2048
    assert cfg.training.micro_batch_size == 1 and cfg.training.gradient_checkpointing is True
    assert cfg.training.gradient_accumulation_steps == 16
    # The seed's values, as in cpt_config.yaml.
    assert cfg.training.learning_rate == 2.0e-5
    assert cfg.training.num_epochs == 2
    assert cfg.data.replay_ratio == 0.2
    assert cfg.training.lora.r == 16 and cfg.training.lora.target_modules == "all-linear"
