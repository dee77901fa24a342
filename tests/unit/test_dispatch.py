"""The ``fsad`` dispatcher: help, subcommand registration, the one-line error contract."""

from __future__ import annotations

import pytest

from fsad_lightning.commands.dispatch import main

COMMANDS = ("fit", "validate", "test", "predict", "benchmark", "generate", "report")


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0)


def test_help_lists_every_subcommand_on_one_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in COMMANDS:
        [line] = [line for line in lines if line.split()[:1] == [name]]
        assert len(line.split()) > 2, line  # a summary follows the name
    assert out.startswith("usage: fsad")


@pytest.mark.parametrize("name", ["benchmark", "generate", "report"])
def test_subcommand_help(name, capsys):
    assert exit_code([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: fsad {name}")


def test_no_command_prints_help_and_fails(capsys):
    assert exit_code([]) == 2
    assert "commands:" in capsys.readouterr().err


def test_unknown_command_is_one_line_with_near_matches(capsys):
    assert exit_code(["benchmrk"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fsad: error: unknown command 'benchmrk'") and "benchmark" in line


def test_a_subcommand_is_one_registration(toy_command, capsys):
    assert main(["toy", "--flag", "1"]) is None  # the console script runs sys.exit(main())
    assert [call["argv"] for call in toy_command.calls] == [["--flag", "1"]]
    main(["--help"])
    assert any(line.split() == ["toy", "a", "toy", "subcommand"] for line in capsys.readouterr().out.splitlines())


def test_user_errors_are_one_line_with_status_2(toy_command, capsys):
    toy_command.behaviour["raise"] = ValueError("k_shot must be >= 1\nsecond line")
    assert exit_code(["toy"]) == 2
    assert capsys.readouterr().err == "fsad: error: k_shot must be >= 1\n"
    # jsonargparse wraps errors raised in __init__: the innermost user error is reported
    wrapped = ValueError("Problem with given class_path")
    wrapped.__cause__ = FileNotFoundError("data root /nowhere does not exist")
    toy_command.behaviour["raise"] = wrapped
    assert exit_code(["toy"]) == 2
    assert capsys.readouterr().err == "fsad: error: data root /nowhere does not exist\n"


def test_missing_weights_are_a_user_error(toy_command, capsys):
    from fsad_lightning.backbones.cnn import WeightsUnavailableError

    toy_command.behaviour["raise"] = WeightsUnavailableError("no weights at /w.pth: download them first")
    assert exit_code(["toy"]) == 2
    assert capsys.readouterr().err == "fsad: error: no weights at /w.pth: download them first\n"


def _wrapped_hub_miss(monkeypatch) -> ValueError:
    """What LightningCLI raises for a model whose timm weights are not cached offline: jsonargparse's
    ValueError, caused by fsad's WeightsUnavailableError, caused by the hub's FileNotFoundError."""
    import timm

    from fsad_lightning.backbones.cnn import create_timm_model

    class LocalEntryNotFound(FileNotFoundError):  # huggingface_hub's LocalEntryNotFoundError is one
        pass

    def offline(*args, **kwargs):
        raise LocalEntryNotFound("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(timm, "create_model", offline)
    try:
        try:
            create_timm_model("wide_resnet50_2")
        except RuntimeError as err:
            raise ValueError("Does not validate against any of the Union subtypes\nErrors: ...") from err
    except ValueError as wrapped:
        return wrapped
    raise AssertionError("create_timm_model loaded weights offline")


def test_the_one_line_is_fsads_own_message_not_the_cause_it_wraps(toy_command, monkeypatch, capsys):
    toy_command.behaviour["raise"] = _wrapped_hub_miss(monkeypatch)
    assert exit_code(["toy"]) == 2
    assert capsys.readouterr().err == (
        "fsad: error: cannot load timm pretrained weights for 'wide_resnet50_2' (hub unreachable or not cached: "
        "LocalEntryNotFound); set `weights` to a local checkpoint path\n"
    )


def test_a_wrapped_parse_error_keeps_the_file_fsad_named(toy_command, tmp_path, capsys):
    from fsad_lightning.data.sampler import load_manifest

    (tmp_path / "manifest.json").write_text("{oops")
    try:
        load_manifest(tmp_path / "manifest.json")
    except ValueError as err:  # fsad's line names the file; its JSONDecodeError cause does not
        toy_command.behaviour["raise"] = err
    assert exit_code(["toy"]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"fsad: error: manifest {tmp_path / 'manifest.json'} is not valid JSON: "), line


def test_a_failed_benchmark_run_names_the_same_line(monkeypatch):
    from fsad_lightning.commands.benchmark import _failure_text

    assert _failure_text(_wrapped_hub_miss(monkeypatch)).startswith("cannot load timm pretrained weights for ")
    assert _failure_text(RuntimeError("a bug\nmore")) == "RuntimeError: a bug"


def test_debug_shows_the_traceback_and_other_errors_propagate(toy_command, monkeypatch):
    toy_command.behaviour["raise"] = ValueError("bad value")
    monkeypatch.setenv("FSAD_DEBUG", "1")
    with pytest.raises(ValueError, match="bad value"):
        main(["toy"])
    monkeypatch.delenv("FSAD_DEBUG")
    toy_command.behaviour["raise"] = RuntimeError("a bug, not the user's mistake")
    with pytest.raises(RuntimeError):
        main(["toy"])


def test_a_full_disk_is_one_line_and_a_dataloader_worker_error_keeps_its_message(toy_command, capsys):
    import errno

    toy_command.behaviour["raise"] = OSError(errno.ENOSPC, "cannot write runs/v0/results.json: No space left")
    assert exit_code(["toy"]) == 2
    assert capsys.readouterr().err == "fsad: error: [Errno 28] cannot write runs/v0/results.json: No space left\n"
    # torch re-raises a worker's error as "Caught ValueError in DataLoader worker process 0." + traceback
    worker = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "folder.py", line 3, in read_image\n    raise ValueError(...)\n'
        "ValueError: cannot read image /data/widget/test/scratch/000.png: not an image file\n"
    )
    toy_command.behaviour["raise"] = worker
    assert exit_code(["toy"]) == 2
    assert capsys.readouterr().err == (
        "fsad: error: cannot read image /data/widget/test/scratch/000.png: not an image file\n"
    )
    # an OSError that is not the environment's (a bug, a network error) keeps its traceback
    toy_command.behaviour["raise"] = OSError(errno.ECONNRESET, "Connection reset by peer")
    with pytest.raises(OSError):
        main(["toy"])
