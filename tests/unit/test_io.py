import json
import os

import pytest

from fsad_lightning.io import atomic_write, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["results.json"]


def test_a_crash_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.md"
    atomic_write_text(target, "old")

    def crash(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.md"]


def test_atomic_files_get_the_users_umask_not_0600(tmp_path):
    import os
    import stat

    from fsad_lightning.io import atomic_write_json, atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "results.md", "| a |\n")
        atomic_write_json(tmp_path / "results.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as handle:  # what config.yaml gets
            handle.write("x")
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("results.md", "results.json", "plain.txt")}
    assert modes == {"results.md": 0o644, "results.json": 0o644, "plain.txt": 0o644}
