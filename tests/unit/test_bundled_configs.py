"""Configs by name: bundled configs and presets, how a ``--config`` value resolves, ``fsad configs``."""

from __future__ import annotations

from pathlib import Path

import pytest

import fsad_lightning
from fsad_lightning.commands import configs
from fsad_lightning.commands.configs import (
    bundle_root,
    bundled_configs,
    configs_main,
    resolve_config,
    resolve_config_args,
)
from fsad_lightning.commands.dispatch import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a folder that holds no configs."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_source_checkout_bundles_the_repository_folders():
    assert bundle_root() == REPO
    on_disk = sorted(f"{d}/{p.name}" for d in ("configs", "callbacks") for p in (REPO / d).glob("*.yaml"))
    assert sorted(e.name for e in bundled_configs()) == on_disk


@pytest.mark.parametrize("entry", bundled_configs(), ids=lambda e: e.name)
def test_every_bundled_yaml_starts_with_a_one_line_summary(entry):
    first = entry.path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and first.endswith(".") and len(first) <= 110, first
    assert entry.description == first[2:]


@pytest.mark.parametrize(
    "value, name",
    [
        ("promptad_mvtec.yaml", "configs/promptad_mvtec.yaml"),
        ("promptad_mvtec", "configs/promptad_mvtec.yaml"),
        ("configs/promptad_mvtec.yaml", "configs/promptad_mvtec.yaml"),
        ("./configs/promptad_mvtec.yaml", "configs/promptad_mvtec.yaml"),
        ("callbacks/visualize.yaml", "callbacks/visualize.yaml"),
        ("visualize", "callbacks/visualize.yaml"),
    ],
)
def test_a_name_resolves_to_the_bundled_file(value, name, elsewhere):
    assert resolve_config(value) == str(bundle_root() / name)


def test_a_real_path_always_wins(elsewhere):
    (elsewhere / "promptad_mvtec.yaml").write_text("model: {}\n")
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "winclip_mvtec.yaml").write_text("model: {}\n")
    assert resolve_config("promptad_mvtec.yaml") == "promptad_mvtec.yaml"
    assert resolve_config("configs/winclip_mvtec.yaml") == "configs/winclip_mvtec.yaml"
    absolute = str(elsewhere / "promptad_mvtec.yaml")
    assert resolve_config(absolute) == absolute


def test_yaml_text_passes_through(elsewhere):
    for text in ("{trainer: {max_epochs: 2}}", "trainer:\n  max_epochs: 2\n", "seed_everything: 3"):
        assert resolve_config(text) == text


def test_an_unknown_name_is_one_line_with_near_matches(elsewhere):
    with pytest.raises(FileNotFoundError) as err:
        resolve_config("promptad_mvtex.yaml")
    message = str(err.value)
    assert "\n" not in message and "promptad_mvtex.yaml" in message
    assert "configs/promptad_mvtec.yaml" in message and "configs/promptad_visa.yaml" in message
    with pytest.raises(FileNotFoundError, match="fsad configs"):
        resolve_config("zzzz.yaml")
    with pytest.raises(FileNotFoundError):  # a missing absolute path is never looked up by name
        resolve_config(str(elsewhere / "promptad_mvtec.yaml"))


def test_a_bare_name_in_both_folders_is_ambiguous(tmp_path, monkeypatch):
    for folder in ("configs", "callbacks"):
        (tmp_path / "root" / folder).mkdir(parents=True)
        (tmp_path / "root" / folder / "same.yaml").write_text("# x.\n")
    monkeypatch.setattr(configs, "bundle_root", lambda: tmp_path / "root")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_config("same")
    assert resolve_config("callbacks/same.yaml") == str(tmp_path / "root" / "callbacks" / "same.yaml")


def test_an_installed_package_reads_its_bundled_folder(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "fsad_lightning"
    (package / "bundled" / "configs").mkdir(parents=True)
    (package / "bundled" / "configs" / "only.yaml").write_text("# The only config.\nmodel: {}\n")
    monkeypatch.setattr(fsad_lightning, "__file__", str(package / "__init__.py"))
    assert bundle_root() == package / "bundled"
    assert [(e.name, e.description) for e in bundled_configs()] == [("configs/only.yaml", "The only config.")]


def test_config_arguments_are_rewritten_in_every_spelling(elsewhere):
    bundled = str(bundle_root() / "configs" / "winclip_tiny.yaml")
    preset = str(bundle_root() / "callbacks" / "visualize.yaml")
    args = ["test", "--config", "winclip_tiny", "-c", "visualize", "--config=winclip_tiny.yaml", "--x", "visualize"]
    assert resolve_config_args(args) == [
        "test", "--config", bundled, "-c", preset, f"--config={bundled}", "--x", "visualize"
    ]  # fmt: skip


def test_fsad_configs_lists_each_file_on_one_line(capsys):
    entries = configs_main([])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(entries) >= 20
    for line, entry in zip(lines, entries):
        assert line.split(None, 1) == [entry.name, entry.description]


def test_fit_print_config_by_name_from_any_folder(elsewhere, capsys):
    # a config and a callback preset, both by name, composed as from the repository root
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "winclip_tiny.yaml", "--config", "callbacks/visualize.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert exit_info.value.code in (0, None)
    assert "fsad_lightning.methods.winclip.WinCLIPModule" in printed
    assert "fsad_lightning.callbacks.visualizer.Visualizer" in printed


def test_benchmark_takes_a_config_by_name(elsewhere, capsys):
    main(["benchmark", "--config", "winclip_tiny", "--categories", "mono", "--shots", "1", "--seeds", "0", "--dry_run"])
    planned = capsys.readouterr().out
    assert f"--config {bundle_root() / 'configs' / 'winclip_tiny.yaml'}" in planned


def test_an_unknown_config_through_fsad_is_one_error_line(elsewhere, capsys):
    for argv in (["test", "--config", "winclp_tiny.yaml"], ["benchmark", "--config", "winclp_tiny.yaml"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("fsad: error: config winclp_tiny.yaml does not exist here")
        assert "configs/winclip_tiny.yaml" in line
