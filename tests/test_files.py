"""Output folders and atomic writes on file systems that refuse: a file in the way, a
read-only or a full file system (real tmpfs mounts, skipped where mounting is not allowed)."""

import pytest

from ssl_kd.cli import main
from ssl_kd.errors import RunFailed, UserError
from ssl_kd.files import check_writable_folder, replace_folder, write_atomic, write_text_atomic
from tests.helpers import fill, mounted_tmpfs, tiny_overrides


def train_args(tmp_path, output_dir):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    return ["train", str(config), *tiny_overrides(output_dir)]


def test_check_creates_the_folder_and_leaves_nothing_else(tmp_path):
    check_writable_folder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"output_dir=.*/file/run lies under the file .*/file"):
        check_writable_folder(tmp_path / "file" / "run")


def test_output_dir_on_a_read_only_file_system_is_one_line(tmp_path, capsys):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=4m") as readonly:
        assert main(train_args(tmp_path, readonly / "run")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"output_dir={readonly / 'run'} cannot be written: Read-only file system" in err


def test_output_dir_on_a_full_file_system_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    with mounted_tmpfs(tmp_path / "full", "size=1m") as full:
        fill(full)
        assert main(train_args(tmp_path, full / "runs" / "run")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "No space left on device" in err
        assert sorted(p.name for p in full.iterdir()) == ["filler"]  # runs/ was removed again


def test_write_on_a_full_file_system_is_one_line_and_keeps_the_old_file(tmp_path):
    with mounted_tmpfs(tmp_path / "full", "size=1m") as full:
        target = full / "checkpoint.pth"
        write_text_atomic(target, "the last good state")
        fill(full)
        with pytest.raises(RunFailed, match=r"cannot write .*checkpoint.pth: No space left"):
            write_atomic(target, lambda handle: handle.write(bytes(256 << 10)))
        assert target.read_text() == "the last good state"
        assert sorted(p.name for p in full.iterdir()) == ["checkpoint.pth", "filler"]


def test_replace_folder_puts_a_whole_folder_in_place_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "export"
    replace_folder(target, lambda folder: (folder / "a.txt").write_text("old"))

    def half_way(folder):
        (folder / "a.txt").write_text("new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_folder(target, half_way)

    def refuse():
        raise RuntimeError("stopped before the rename")

    with pytest.raises(RuntimeError):  # a whole new folder, stopped before it moves in
        replace_folder(target, lambda folder: (folder / "a.txt").write_text("new"), refuse)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .export.tmp-* left
    replace_folder(target, lambda folder: (folder / "b.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old one is gone
