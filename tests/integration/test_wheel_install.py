"""A non-editable wheel install ships the configs and presets: ``fsad configs`` and ``--config NAME`` work
from a folder that holds no configs.

The wheel is built offline from a copy of the sources (so no stale ``build/`` folder of the checkout
leaks into it) with the environment's own setuptools, and installed into a fresh venv. A venv created
by a venv's python sees only the base interpreter's packages (``--system-site-packages`` would not
reach torch here), so the project environment's site-packages is appended to the new venv's path by a
``.pth`` line, written after the install so pip never sees the editable fsad_lightning there; a plain
path line does not run that environment's ``.pth`` files, so its editable finder stays off and the
wheel's fsad_lightning is the one imported (checked).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "fsad_lightning", "configs", "callbacks")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_wheel_install_resolves_bundled_configs_from_any_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), "."], source, env)
    [wheel] = dist.glob("fsad_lightning-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)], tmp_path, env)
    site_packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    Path(site_packages.strip(), "project_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported = _run([str(python), "-c", "import fsad_lightning; print(fsad_lightning.__file__)"], elsewhere, env)
    assert Path(imported.strip()).is_relative_to(venv), imported

    fsad = str(venv / "bin" / "fsad")
    listed = _run([fsad, "configs"], elsewhere, env).splitlines()
    names = [line.split()[0] for line in listed]
    expected = [f"{d}/{p.name}" for d in ("configs", "callbacks") for p in sorted((REPO / d).glob("*.yaml"))]
    assert names == expected
    assert all(len(line.split(None, 1)) == 2 for line in listed)  # each with its description

    # the papers' reported numbers ship in the wheel beside the module that reads them
    count_papers = "from fsad_lightning.paper_results import load_paper_results; print(len(load_paper_results()))"
    assert int(_run([str(python), "-c", count_papers], elsewhere, env)) > 900

    printed = _run([fsad, "fit", "--config", "promptad_mvtec.yaml", "--print_config"], elsewhere, env)
    assert "class_path: fsad_lightning.methods.promptad.PromptADModule" in printed
    assert "ViT-B-16-plus-240" in printed
