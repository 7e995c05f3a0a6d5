"""write_text_atomic: the file holds the old text or the new, never part of either; locked: one holder at a time."""

import pytest

from training.files import locked, write_text_atomic


def test_a_write_replaces_whole_and_a_failed_one_leaves_the_old_text(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new é")
    assert path.read_text(encoding="utf-8") == "new é" and [p.name for p in tmp_path.iterdir()] == ["record.json"]

    import os
    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    write_text_atomic(path, "newer")
    assert calls == ["fsync", "replace", "fsync"]  # the text on disk before its name, the name before the return

    def killed(fd):  # the disk fails before the text is on it
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "a much longer text")
    assert path.read_text(encoding="utf-8") == "newer"  # the old text, and no temporary file left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_lock_has_one_holder_and_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch, capsys):
    import fcntl
    import threading
    path, order = tmp_path / "x.lock", []

    def second():
        with locked(path):
            order.append("second")
    with locked(path):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # waits for the lock (another open of the file: another holder)
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]

    def refuse(handle, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)
    with locked(path):
        order.append("unlocked")
    assert order[-1] == "unlocked" and f"cannot lock {path}" in capsys.readouterr().err
