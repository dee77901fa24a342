"""W&B sweep definitions expand offline into valid ``fsad`` invocations (and bad keys fail)."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import yaml

from fsad_lightning.commands.benchmark import benchmark_main, build_parser
from fsad_lightning.commands.lightning_cli import run_cli
from fsad_lightning.commands.sweeps import (
    fsad_arguments,
    load_sweep,
    sample_parameter,
    sweep_command,
    sweep_parameter_sets,
)

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _fsad_argv(monkeypatch):
    """In-process ``fsad`` calls see a bare command line (LightningCLI warns about pytest's own arguments)."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def _config_paths(args: list[str]) -> list[Path]:
    return [REPO / args[i + 1] for i, token in enumerate(args[:-1]) if token == "--config"]


def _nested(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _print_config(args: list[str], capsys) -> dict:
    """``fsad <args> --print_config`` in process: the resolved config (fails on an unknown key)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*args, "--print_config"])
    printed = capsys.readouterr().out
    assert exit_info.value.code in (0, None), printed
    return yaml.safe_load(printed)


def test_the_sweeps_folder_has_the_documented_sweeps():
    names = {p.name for p in SWEEPS}
    assert {
        "patchknn_quickstart_pool_size.yaml",
        "promptad_lambda.yaml",
        "one_to_normal_weights.yaml",
        "one_to_normal_mvtec_grid.yaml",
    } <= names


def _benchmark_options() -> set[str]:
    """``fsad benchmark``'s own options (``categories``, ``shots``, ``seeds``, ...): a grid sweep over them
    spreads one benchmark, one run per trial."""
    return {action.dest for action in build_parser()._actions}


@pytest.mark.parametrize("sweep_path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_expands_into_valid_fsad_invocations(sweep_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the agent runs from the repository root; config paths are relative to it
    sweep = load_sweep(sweep_path)
    parameter_sets = sweep_parameter_sets(sweep, num_samples=2, seed=0)
    assert parameter_sets
    for index, params in enumerate(parameter_sets):
        command = sweep_command(sweep, params)
        args = fsad_arguments(command)
        assert args[0] in ("fit", "test", "benchmark")
        for key, value in params.items():
            assert f"--{key}={value}" in args  # the ${args} macro, as the W&B agent formats it
        missing = [p for p in _config_paths(args) if not p.is_file()]
        if missing:
            pytest.skip(
                f"{sweep_path.name} runs {missing[0].relative_to(REPO)}, which is not in the checkout yet"
            )

        if args[0] == "benchmark":
            options = {k: v for k, v in params.items() if k in _benchmark_options()}
            params = {k: v for k, v in params.items() if k not in options}
            if options:  # a grid over the benchmark's own options: every trial plans exactly one run
                parsed, _ = build_parser().parse_known_args(args[1:])
                assert [getattr(parsed, k) for k in options] == [[v] for v in options.values()]
            if index in (0, len(parameter_sets) - 1):  # the first and last sets: their dry runs
                # parse the configs and the swept keys, and plan the runs
                assert benchmark_main([*args[1:], "--dry_run"]) is None
                planned = capsys.readouterr().out
                assert all(f"--{key}={value}" in planned for key, value in params.items())
                if options:
                    assert "= 1 runs" in planned and f"--data.init_args.k_shot={options['shots']}" in planned
                stage = "fit" if "(trainable)" in planned else "test"
            if not params:
                continue
            # ... and each parameter set is checked as the fsad call every run of it makes
            configs = [t for i, t in enumerate(args) if t == "--config" or (i and args[i - 1] == "--config")]
            args = [stage, *configs, *[f"--{k}={v}" for k, v in params.items()]]
        resolved = _print_config(args, capsys)
        for key, value in params.items():
            assert _nested(resolved, key) == pytest.approx(value)


def test_unknown_swept_key_fails(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = {
        "method": "grid",
        "parameters": {"model.init_args.no_such_key": {"values": [1]}},
        "command": ["${env}", "fsad", "test", "--config", "configs/quickstart.yaml", "${args}"],
    }
    args = fsad_arguments(sweep_command(sweep, sweep_parameter_sets(sweep)[0]))
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*args, "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "no_such_key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the same key through fsad benchmark's dry run
        benchmark_main(
            ["--config", "configs/quickstart.yaml", "--categories", "mono", *args[3:], "--dry_run"]
        )
    assert exit_info.value.code not in (0, None)


def test_grid_is_the_product_and_commands_use_the_agent_macros():
    sweep = {
        "method": "grid",
        "program": "train.py",
        "parameters": {"a": {"values": [1, 2]}, "b": {"value": "x"}, "c": {"min": 1, "max": 3}},
    }
    sets = sweep_parameter_sets(sweep)
    assert len(sets) == 6 and {"a": 2, "b": "x", "c": 3} in sets
    command = sweep_command(sweep, {"a": 1, "flag": True})  # the agent's default command
    assert command[1:] == ["python", "train.py", "--a=1", "--flag=True"]
    with pytest.raises(ValueError, match="does not call fsad"):
        fsad_arguments(command)
    assert fsad_arguments(["/usr/bin/env", "python", "-m", "fsad_lightning.commands", "fit", "--x=1"]) == [
        "fit",
        "--x=1",
    ]
    with pytest.raises(ValueError, match="must list values"):
        sweep_parameter_sets({"method": "grid", "parameters": {"a": {"min": 0.1, "max": 0.2}}})


@pytest.mark.parametrize(
    "spec, check",
    [
        ({"distribution": "uniform", "min": 0.5, "max": 2.0}, lambda v: 0.5 <= v <= 2.0),
        ({"min": 2, "max": 5}, lambda v: isinstance(v, int) and 2 <= v <= 5),
        (
            {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
            lambda v: (v / 0.25) == round(v / 0.25),
        ),
        ({"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}, lambda v: 1e-4 <= v <= 1e-1),
        ({"distribution": "inv_log_uniform_values", "min": 0.1, "max": 10.0}, lambda v: 0.1 <= v <= 10.0),
        ({"distribution": "log_uniform", "min": -2.0, "max": 0.0}, lambda v: math.exp(-2) <= v <= 1.0),
        ({"values": ["a", "b"]}, lambda v: v in ("a", "b")),
        ({"value": 7}, lambda v: v == 7),
        ({"distribution": "normal", "mu": 0.0, "sigma": 1.0}, lambda v: isinstance(v, float)),
    ],
)
def test_random_draws_stay_in_their_ranges(spec, check):
    rng = random.Random(0)
    assert all(check(sample_parameter("p", spec, rng)) for _ in range(50))


def test_bad_sweep_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "missing.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text("method: evolutionary\nparameters: {a: {values: [1]}}\ncommand: [fsad]\n")
    with pytest.raises(ValueError, match="grid, random or bayes"):
        load_sweep(path)
    path.write_text("method: grid\nparameters: {a: 3}\ncommand: [fsad]\n")
    with pytest.raises(ValueError, match="parameter 'a'"):
        load_sweep(path)
    with pytest.raises(ValueError, match="min < max"):
        sample_parameter("p", {"distribution": "uniform", "min": 1.0, "max": 1.0}, random.Random(0))
