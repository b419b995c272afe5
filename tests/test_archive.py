"""Tests of companion.data.archive and ``python -m companion pack``: wells in one file, read back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from companion.cli import main
from companion.data.archive import archive_wells, pack_samples, read_archive
from companion.data.bbbc010 import CHANNEL_MAX, Sample, load_bbbc010, normalize
from companion.data.synthetic import make_dataset


def _camera_samples(n: int = 2, shape: tuple[int, int] = (24, 40)) -> list[Sample]:
    """Synthetic wells whose images are raw counts / CHANNEL_MAX, as BBBC010's are."""
    out = []
    for s in make_dataset(n, seed=3, shape=shape):
        raw = np.rint(s.image * CHANNEL_MAX[0]).astype(np.uint16)
        out.append(Sample(s.well, np.stack([normalize(r, c) for c, r in enumerate(raw)]), s.instances))
    out.append(Sample("EMPTY", out[0].image, np.zeros((0,) + shape, bool)))
    return out


def _same(a: Sample, b: Sample) -> bool:
    return (
        a.well == b.well
        and a.image.dtype == b.image.dtype
        and np.array_equal(a.image, b.image)
        and a.instances.dtype == b.instances.dtype
        and np.array_equal(a.instances, b.instances)
    )


def test_the_archive_reads_back_exactly(tmp_path):
    samples = _camera_samples()
    path = tmp_path / "pack.npz"
    size = pack_samples(samples, path)
    assert size == path.stat().st_size
    assert archive_wells(path) == [s.well for s in samples]
    assert all(_same(a, b) for a, b in zip(samples, read_archive(path)))
    picked = read_archive(path, [samples[1].well, samples[0].well])
    assert [s.well for s in picked] == [samples[1].well, samples[0].well]
    with pytest.raises(KeyError, match="holds no well A01"):
        read_archive(path, ["A01"])
    with pytest.warns(UserWarning, match="not in"):
        assert [s.well for s in read_archive(path, ["A01", samples[0].well], skip_missing=True)] == [
            samples[0].well
        ]
    with np.load(path, allow_pickle=False) as archive:  # plain numpy reads it, no pickles
        assert archive[f"{samples[0].well}_image"].dtype == np.uint8


def test_only_camera_counts_are_packed_and_only_archives_are_read(tmp_path):
    with pytest.raises(ValueError, match="losslessly"):
        pack_samples(make_dataset(1, shape=(16, 16)), tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="companion pack"):
        read_archive(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(2))
    with pytest.raises(ValueError, match="not a companion data archive"):
        read_archive(other)


@pytest.mark.realdata
def test_the_pack_command_writes_what_data_root_reads(bbbc010_root, tmp_path, capsys):
    archive = tmp_path / "wells.npz"
    assert main(["pack", str(archive), "--data-root", str(bbbc010_root), "--wells", "A01", "C13", "C03"]) == 0
    assert "1 incomplete skipped: C13" in capsys.readouterr().out
    folder = load_bbbc010(bbbc010_root, ["A01", "C03"], progress=False)
    again = load_bbbc010(archive, ["C03", "A01"], progress=False)  # --data-root accepts the file
    assert [s.well for s in again] == ["C03", "A01"]
    assert _same(folder[1], again[0]) and _same(folder[0], again[1])
    assert main(["pack", str(tmp_path), "--data-root", str(bbbc010_root)]) == 2
    assert "is a folder" in capsys.readouterr().err
