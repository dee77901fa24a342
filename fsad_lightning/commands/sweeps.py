"""W&B sweep definitions (``sweeps/*.yaml``) expanded offline.

:func:`load_sweep`, :func:`sweep_parameter_sets` and :func:`sweep_command` turn a sweep definition into
the command lines a W&B agent would run, and :func:`fsad_arguments` into the arguments ``fsad`` receives,
so tests can check that every swept key exists. A sweep whose trials are benchmarks runs
``fsad benchmark ... --wandb`` (:mod:`fsad_lightning.commands.benchmark` logs the mean row the sweep
optimises).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """Read a W&B sweep definition (YAML) and check its shape.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no ``parameters`` / ``command``, an unknown ``method``, or a malformed parameter.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep definition {path} does not exist")
    sweep = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(sweep, dict):
        raise ValueError(f"{path}: expected a mapping with method, parameters and command")
    if sweep.get("method") not in ("grid", "random", "bayes"):
        raise ValueError(f"{path}: method must be grid, random or bayes, got {sweep.get('method')!r}")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ValueError(f"{path}: 'parameters' must map swept keys to their values or distributions")
    for key, spec in parameters.items():
        if not isinstance(spec, dict) or not ({"value", "values", "min", "max", "mu"} & set(spec)):
            raise ValueError(
                f"{path}: parameter {key!r} needs value, values, min/max or mu/sigma, got {spec!r}"
            )
    if not isinstance(sweep.get("command"), list):
        raise ValueError(f"{path}: 'command' must list the command line (with ${{args}}) that runs fsad")
    return sweep


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_parameter(name: str, spec: dict[str, Any], rng: random.Random) -> Any:
    """Draw one value of a swept parameter as the W&B controller would for random / bayes search.

    Distributions: ``constant`` (``value``), ``categorical`` (``values``), ``int_uniform``, ``uniform``,
    ``q_uniform``, ``log_uniform_values``, ``q_log_uniform_values``, ``inv_log_uniform_values``,
    ``log_uniform`` (``min`` / ``max`` are natural-log exponents), ``normal`` / ``q_normal`` /
    ``log_normal`` (``mu``, ``sigma``). Without ``distribution`` W&B infers it: ``value`` constant,
    ``values`` categorical, integer ``min`` / ``max`` int_uniform, otherwise uniform.
    """
    distribution = spec.get("distribution")
    if distribution is None:
        if "value" in spec:
            distribution = "constant"
        elif "values" in spec:
            distribution = "categorical"
        elif _is_int(spec.get("min")) and _is_int(spec.get("max")):
            distribution = "int_uniform"
        else:
            distribution = "uniform"
    low, high, q = spec.get("min"), spec.get("max"), spec.get("q", 1.0)
    if distribution == "constant":
        return spec["value"]
    if distribution == "categorical":
        return rng.choice(list(spec["values"]))
    if distribution in ("normal", "q_normal", "log_normal"):
        value = rng.gauss(float(spec.get("mu", 0.0)), float(spec.get("sigma", 1.0)))
        value = math.exp(value) if distribution == "log_normal" else value
        return round(value / q) * q if distribution == "q_normal" else value
    if low is None or high is None or not low < high:
        raise ValueError(f"sweep parameter {name!r}: {distribution} needs min < max, got {spec!r}")
    if distribution == "int_uniform":
        return rng.randint(int(low), int(high))
    if distribution == "uniform":
        return rng.uniform(float(low), float(high))
    if distribution == "q_uniform":
        return round(rng.uniform(float(low), float(high)) / q) * q
    if distribution in ("log_uniform_values", "q_log_uniform_values"):
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
        return round(value / q) * q if distribution.startswith("q_") else value
    if distribution == "inv_log_uniform_values":
        return 1.0 / math.exp(rng.uniform(math.log(1.0 / high), math.log(1.0 / low)))
    if distribution == "log_uniform":
        return math.exp(rng.uniform(float(low), float(high)))
    raise ValueError(f"sweep parameter {name!r}: unknown distribution {distribution!r}")


def sweep_parameter_sets(sweep: dict[str, Any], num_samples: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """The parameter sets a sweep would try: the full grid for ``method: grid``, else ``num_samples``
    random draws (:func:`sample_parameter`; bayes search starts from random draws too)."""
    parameters = sweep["parameters"]
    if sweep["method"] == "grid":
        axes = []
        for name, spec in parameters.items():
            if "value" in spec:
                axes.append([spec["value"]])
            elif "values" in spec:
                axes.append(list(spec["values"]))
            elif _is_int(spec.get("min")) and _is_int(spec.get("max")):
                axes.append(list(range(spec["min"], spec["max"] + 1)))
            else:
                raise ValueError(f"grid sweep parameter {name!r} must list values (or integer min/max)")
        return [dict(zip(parameters, combo)) for combo in itertools.product(*axes)]
    rng = random.Random(seed)
    return [{n: sample_parameter(n, s, rng) for n, s in parameters.items()} for _ in range(num_samples)]


def sweep_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command line the W&B agent runs for ``params``: the sweep's ``command`` (default
    ``${env} ${interpreter} ${program} ${args}``) with the agent's macros expanded (``${args}``:
    ``--key=value`` per parameter, formatted with ``str`` as the agent does)."""
    flags = {
        "args": [f"--{k}={v}" for k, v in params.items()],
        "args_no_hyphens": [f"{k}={v}" for k, v in params.items()],
        "args_no_equals": [t for k, v in params.items() for t in (f"--{k}", str(v))],
        "args_no_boolean_flags": [
            f"--{k}" if isinstance(v, bool) else f"--{k}={v}" for k, v in params.items() if v is not False
        ],
        "args_json": [json.dumps(params)],
        "interpreter": ["python"],
        "program": [str(sweep.get("program", ""))] if sweep.get("program") else [],
        "env": [] if platform.system() == "Windows" else ["/usr/bin/env"],
    }
    command = []
    for token in sweep.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]:
        token = str(token)
        if token.startswith("${") and token.endswith("}"):
            if token[2:-1] not in flags:
                raise ValueError(f"sweep command uses {token}, which fsad sweeps do not expand")
            command += flags[token[2:-1]]
        else:
            command.append(token)
    return command


def fsad_arguments(command: Sequence[str]) -> list[str]:
    """The arguments of the ``fsad`` call in an expanded sweep command (``fsad ...`` or
    ``python -m fsad_lightning.commands ...``): what :func:`fsad_lightning.commands.dispatch.main`
    receives.

    Raises:
        ValueError: the command does not call fsad.
    """
    command = list(command)
    for i, token in enumerate(command):
        if os.path.basename(token) == "fsad":
            return command[i + 1 :]
        if token == "-m" and i + 1 < len(command) and command[i + 1] == "fsad_lightning.commands":
            return command[i + 2 :]
    raise ValueError(f"the sweep command does not call fsad: {' '.join(command)}")
