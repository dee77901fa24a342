"""Configs by name: the method x dataset configs and callback presets that ship with the package.

The repository's ``configs/*.yaml`` and ``callbacks/*.yaml`` are the only copies in git. A wheel carries
them as ``fsad_lightning/bundled/configs`` and ``fsad_lightning/bundled/callbacks`` (``setup.py`` maps
the two folders into the package); a source checkout or an editable install reads them from the
repository root beside the package (:func:`bundle_root`).

``--config VALUE`` (``-c VALUE``, ``--config=VALUE``) of any ``fsad`` command is resolved by
:func:`resolve_config`: a path that exists (relative to the current directory, or absolute) always wins;
otherwise a bundled file of that name is used: ``promptad_mvtec.yaml``, ``promptad_mvtec``,
``configs/promptad_mvtec.yaml``, ``visualize`` or ``callbacks/visualize.yaml``. A name that is neither
is a one-line error listing near matches. A value that is YAML text rather than a file name (jsonargparse
accepts ``--config '{trainer: {max_epochs: 2}}'``) is passed on untouched. A config file is read once
first (:func:`check_config_file`): a YAML syntax error names the file and the line, and an empty or
comment-only file is said to be one, instead of jsonargparse's usage text.

``fsad configs`` lists the bundled files, one line each: the name and the YAML's first comment line.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

import fsad_lightning

#: the bundled folders, in lookup order (a bare name is looked up in both)
BUNDLED_FOLDERS = ("configs", "callbacks")
#: the folder inside an installed package that holds :data:`BUNDLED_FOLDERS`
INSTALLED_FOLDER = "bundled"
YAML_SUFFIXES = (".yaml", ".yml")
CONFIG_FLAGS = ("--config", "-c")


def bundle_root() -> Path:
    """The folder holding ``configs/`` and ``callbacks/``: ``<package>/bundled`` in an installed wheel,
    else the repository root of a source checkout (or editable install), beside the package."""
    package = Path(fsad_lightning.__file__).resolve().parent
    installed = package / INSTALLED_FOLDER
    return installed if installed.is_dir() else package.parent


@dataclass(frozen=True)
class BundledConfig:
    """One bundled YAML file: ``name`` is its path relative to :func:`bundle_root`
    (``configs/promptad_mvtec.yaml``)."""

    name: str
    path: Path

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def description(self) -> str:
        """The file's first comment line (every bundled YAML starts with a one-line summary)."""
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if line.startswith("#"):
                    return line.lstrip("#").strip()
                if line:
                    break
        return ""


def bundled_configs() -> list[BundledConfig]:
    """Every bundled YAML file, configs first, sorted by name within each folder."""
    root = bundle_root()
    found = []
    for folder in BUNDLED_FOLDERS:
        directory = root / folder
        if directory.is_dir():
            files = sorted(p for p in directory.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file())
            found += [BundledConfig(f"{folder}/{p.name}", p) for p in files]
    return found


def looks_like_yaml_text(value: str) -> bool:
    """Whether a ``--config`` value is YAML text rather than a file name."""
    stripped = value.strip()
    return "\n" in value or stripped[:1] in ("{", "[") or ": " in stripped


def _key(name: str) -> str:
    """``./configs/x.yaml`` -> ``configs/x``: what a user's name is compared by."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    for suffix in YAML_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_bundled(name: str) -> BundledConfig | None:
    """The bundled file ``name`` denotes (``x``, ``x.yaml``, ``configs/x.yaml``), ``None`` for none.

    Raises:
        ValueError: a bare name matches files in both folders.
    """
    key = _key(name)
    entries = bundled_configs()
    exact = [e for e in entries if _key(e.name) == key]
    if exact:
        return exact[0]
    if "/" in key:
        return None
    by_stem = [e for e in entries if e.stem == key]
    if len(by_stem) > 1:
        raise ValueError(
            f"config {name!r} is ambiguous: bundled as {', '.join(e.name for e in by_stem)}; name the folder"
        )
    return by_stem[0] if by_stem else None


def near_matches(name: str, limit: int = 4, cutoff: float = 0.6) -> list[str]:
    """Bundled names closest to ``name``, compared by full name and by file stem, best first."""
    key = _key(name)
    stem = key.rsplit("/", 1)[-1]

    def similarity(entry: BundledConfig) -> float:
        return max(
            difflib.SequenceMatcher(None, key, _key(entry.name)).ratio(),
            difflib.SequenceMatcher(None, stem, entry.stem).ratio(),
        )

    scored = sorted(((similarity(e), e.name) for e in bundled_configs()), key=lambda pair: -pair[0])
    return [name for score, name in scored if score >= cutoff][:limit]


def check_config_file(path: str) -> None:
    """ValueError naming ``path`` when it is not a YAML mapping: a syntax error (with its line and
    column), an empty or comment-only file, or a list / scalar at the top."""
    if os.path.isdir(path):
        raise ValueError(f"config {path} is a folder: give a .yaml file")
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise ValueError(f"config {path} is not a text file ({err.reason})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config {path} has a YAML syntax error{where}: {problem}") from err
    if content is None:
        raise ValueError(
            f"config {path} is empty (or holds only comments): a config maps sections such as model, data, "
            "trainer"
        )
    if not isinstance(content, dict):
        raise ValueError(
            f"config {path} holds a YAML {type(content).__name__}: a config maps sections such as model, data, "
            "trainer"
        )


def resolve_config(value: str) -> str:
    """The file a ``--config`` value names: the value itself when it is an existing path (or YAML text),
    else the bundled file's absolute path.

    Raises:
        FileNotFoundError: neither a file nor a bundled name (the message lists near matches).
        ValueError: the file is not a YAML mapping (:func:`check_config_file`).
    """
    if looks_like_yaml_text(value):
        return value
    if os.path.exists(value):
        check_config_file(value)
        return value
    bundled = None if os.path.isabs(value) else find_bundled(value)
    if bundled is not None:
        return str(bundled.path)
    matches = near_matches(value)
    hint = f"did you mean {', '.join(matches)}?" if matches else "`fsad configs` lists them"
    raise FileNotFoundError(
        f"config {value} does not exist here ({os.getcwd()}) and is not a bundled config; {hint}"
    )


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with the value of every ``--config`` / ``-c`` resolved by :func:`resolve_config`."""
    resolved = list(args)
    for i, token in enumerate(resolved):
        if token in CONFIG_FLAGS and i + 1 < len(resolved):
            resolved[i + 1] = resolve_config(resolved[i + 1])
        else:
            flag, equals, value = token.partition("=")
            if equals and flag in CONFIG_FLAGS:
                resolved[i] = f"{flag}={resolve_config(value)}"
    return resolved


def configs_main(argv: Sequence[str] | None = None) -> list[BundledConfig]:
    """``fsad configs``: print every bundled config and preset with its one-line description."""
    parser = argparse.ArgumentParser(
        prog="fsad configs",
        description="List the configs and callback presets bundled with fsad_lightning; any of them "
        "works by name from any folder: fsad test --config NAME.yaml",
    )
    parser.parse_args(list(argv or []))
    entries = bundled_configs()
    if not entries:
        raise FileNotFoundError(f"no bundled configs found under {bundle_root()} (a broken install?)")
    width = max(len(e.name) for e in entries)
    for entry in entries:
        print(f"{entry.name:<{width}}  {entry.description}")
    return entries
