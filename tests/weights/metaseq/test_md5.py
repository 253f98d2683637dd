import hashlib
import logging

import pytest

from optkit.weights.folder import WeightError
from optkit.weights.metaseq.md5 import read_md5_csv, verify_md5, write_md5_csv


def make_files(tmp_path, names):
    files = []
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(bytes([i]) * (1000 + i))
        files.append(tmp_path / n)
    return files


def test_meta_format_crlf_sorted_no_final_newline(tmp_path):
    names = [f"checkpoint_last-model_part-0-shard{r}.pt" for r in (0, 1, 2, 10, 100)]
    files = make_files(tmp_path, names)
    raw = write_md5_csv(tmp_path / "sums.csv", files).read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[0] == b"shard,md5sum" and not raw.endswith(b"\n")
    assert [ln.split(b",")[0].decode() for ln in lines[1:]] == [
        names[0], names[1], names[3], names[4], names[2]]  # shard0, 1, 10, 100, 2
    sums = read_md5_csv(tmp_path / "sums.csv")
    assert sums[names[2]] == hashlib.md5((tmp_path / names[2]).read_bytes()).hexdigest()
    verify_md5(tmp_path / "sums.csv", files, progress=False)


def test_mismatch_missing_unlisted_and_bad_files(tmp_path, caplog):
    files = make_files(tmp_path, ["a.pt", "b.pt", "c.pt"])
    write_md5_csv(tmp_path / "sums.csv", files[:2])
    with caplog.at_level(logging.WARNING):
        verify_md5(tmp_path / "sums.csv", files, progress=False)
    assert "c.pt" in caplog.text
    files[1].write_bytes(b"changed")
    with pytest.raises(WeightError, match="md5 mismatch for checkpoint file .*b.pt"):
        verify_md5(tmp_path / "sums.csv", files, progress=False)
    with pytest.raises(WeightError, match="missing checkpoint file .*b.pt"):
        verify_md5(tmp_path / "sums.csv", [files[0]], progress=False)
    (tmp_path / "bad.csv").write_text("name,hash\na.pt,123\n")
    with pytest.raises(WeightError, match="not an md5 sums file"):
        read_md5_csv(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("shard,md5sum\na.pt,123\n")
    with pytest.raises(WeightError, match="line 2"):
        read_md5_csv(tmp_path / "bad.csv")
