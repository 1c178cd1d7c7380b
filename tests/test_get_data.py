"""get_data.py: a data folder is checked byte for byte, downloads land only when their sha256 is the
pinned one, and a file already there is never overwritten."""
import hashlib
import os

import pytest

import get_data
from plumbing.files import DataError

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def pinned(tmp_path, contents):
    """FILES-like table over file:// URLs of a stand-in 'remote' folder, pinned to `contents`."""
    remote = tmp_path / "remote"
    remote.mkdir()
    files = {}
    for name, data in contents.items():
        (remote / name).write_bytes(data)
        files[name] = ((remote / name).as_uri(), len(data), hashlib.sha256(data).hexdigest())
    return files


def test_download_fills_only_the_missing_files_and_check_verifies_them(tmp_path, capsys):
    files = pinned(tmp_path, {"a.jsonl": b'{"x": 1}\n', "b.jsonl": b'{"y": 2}\n'})
    out = tmp_path / "data"
    out.mkdir()
    (out / "a.jsonl").write_bytes(b'{"x": 1}\n')
    os.utime(out / "a.jsonl", (0, 0))  # to see that it is not rewritten
    status = get_data.main(get_data.Config(out_dir=str(out)), files)
    assert status == {"a.jsonl": "ok", "b.jsonl": "ok"}
    assert os.stat(out / "a.jsonl").st_mtime == 0 and (out / "b.jsonl").read_bytes() == b'{"y": 2}\n'
    printed = capsys.readouterr().out
    assert "b.jsonl: file://" in printed and "a.jsonl: file://" not in printed
    assert get_data.main(get_data.Config(check=str(out)), files) == status
    assert sorted(os.listdir(out)) == ["a.jsonl", "b.jsonl"]  # no .part left behind


def test_a_changed_source_or_local_file_is_named_and_nothing_is_replaced(tmp_path):
    files = pinned(tmp_path, {"a.jsonl": b"1\n", "b.jsonl": b"2\n"})
    (tmp_path / "remote" / "b.jsonl").write_bytes(b"3\n")  # the public file changed after pinning
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"b.jsonl: file://.* is not the expected file"):
        get_data.main(get_data.Config(out_dir=str(out)), files)
    assert sorted(os.listdir(out)) == ["a.jsonl"]  # the good one kept, no .part
    (out / "a.jsonl").write_bytes(b"edited\n")
    with pytest.raises(SystemExit, match=r"2 of 2 files .* missing or differ .*: a.jsonl, b.jsonl"):
        get_data.main(get_data.Config(check=str(out)), files)
    assert get_data.check(str(out), files)["a.jsonl"].startswith("differs (size 7, expected 2")
    with pytest.raises(DataError, match="cannot download"):
        get_data.main(get_data.Config(out_dir=str(out)), {"c.jsonl": ((tmp_path / "gone").as_uri(), 1, "0" * 64)})
    assert (out / "a.jsonl").read_bytes() == b"edited\n"  # never overwritten
    with pytest.raises(DataError, match="--check .*: not a directory"):
        get_data.main(get_data.Config(check=str(tmp_path / "nowhere")), files)


def test_the_shared_data_folder_holds_exactly_the_pinned_public_files():
    folder = os.path.join(HERE, "..", "shared", "data")
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} is absent")
    assert get_data.check(folder) == {name: "ok" for name in get_data.FILES}
