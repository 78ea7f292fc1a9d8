"""The conversion write path chosen by measurement: a fake timer picks the plan, the per-filesystem cache,
PGCONV_WRITER, and a real (small) probe that leaves nothing behind."""

from __future__ import annotations

import errno
import json

import pytest

from pgconv import tuning
from pgconv.converter import write_path
from pgconv.converter.write_path import Plan
from pgconv.errors import InputError


@pytest.fixture
def probing(tmp_path, monkeypatch):
    """PGCONV_WRITER=auto, an empty cache; `seconds[plan name]` is what writing the probe takes (fake timer)."""
    monkeypatch.setenv("PGCONV_WRITER", "auto")
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path / "cache"))
    seconds: dict[str, float] = {}
    timed: list[str] = []

    def fake(directory, plan, **kwargs):
        timed.append(plan.name)
        if seconds.get(plan.name) == "EINVAL":
            raise OSError(errno.EINVAL, "direct I/O refused")
        return seconds.get(plan.name, 1.0)

    monkeypatch.setattr(write_path, "_time_write", fake)
    write_path.reset()
    (tmp_path / "dst").mkdir()
    yield tmp_path / "dst", seconds, timed
    write_path.reset()


BIG, SMALL = write_path.DEFAULT_STAGE, min(8 << 20, write_path.DEFAULT_STAGE)  # 32 and 8 MiB on <= 5 cores


def _name(mode: str, stage: int = BIG, workers: int = write_path.DEFAULT_WORKERS) -> str:
    return Plan(mode, stage, workers).name


def test_a_fake_timer_picks_the_plan_and_it_is_cached_per_filesystem(probing, monkeypatch):
    dst, seconds, timed = probing
    seconds.update({_name("buffered", SMALL): 0.3, _name("buffered", SMALL, 2): 0.25})
    plan = write_path.plan_for(dst)
    assert (plan.mode, plan.stage, plan.workers, plan.source) == ("buffered", SMALL, 2, "measured")
    assert len(timed) == 5 and plan.rates[_name("buffered", SMALL)] == write_path.PROBE_BYTES / 0.3
    assert write_path.plan_for(dst) == plan and len(timed) == 5  # once per process
    write_path.reset()  # a new process: from the cache file, no probe
    cached = write_path.plan_for(dst)
    assert (cached.mode, cached.stage, cached.workers, cached.source) == ("buffered", SMALL, 2, "cached")
    assert len(timed) == 5
    real = write_path._fs_key
    monkeypatch.setattr(write_path, "_fs_key", lambda d: {**real(d), "st_dev": -1})  # another filesystem
    assert write_path.plan_for(dst).source == "measured" and len(timed) == 10


def test_noise_does_not_replace_the_default_plan(probing):
    dst, seconds, _ = probing
    seconds.update({_name("buffered"): 0.97, _name("direct", BIG, 2): 0.97})  # 3 % faster: not enough
    plan = write_path.plan_for(dst)
    assert (plan.mode, plan.stage, plan.workers) == ("direct", BIG, write_path.DEFAULT_WORKERS)


def test_a_filesystem_without_o_direct_gets_buffered_and_a_failing_probe_the_default(probing, monkeypatch):
    dst, seconds, timed = probing
    seconds.update({_name("direct"): "EINVAL", _name("direct", SMALL): "EINVAL"})
    assert write_path.plan_for(dst).mode == "buffered"

    def full(directory, plan, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(write_path, "_time_write", full)
    write_path.reset()
    monkeypatch.setattr(write_path, "_fs_key", lambda d: {"st_dev": -2, "fstype": "x", "source": "y"})
    plan = write_path.plan_for(dst, stage=8192, workers=3)
    assert (plan.mode, plan.stage, plan.workers, plan.source) == ("direct", 8192, 3, "default")
    write_path.reset()
    assert write_path.plan_for(dst).source == "default"  # not cached: measured again next time


def test_a_corrupt_cache_entry_is_measured_again(probing):
    dst, _, timed = probing
    write_path.plan_for(dst)
    (path,) = (dst.parent / "cache" / "tuning").glob("writer-*.json")
    for junk in ("{oops", json.dumps({"key": json.loads(path.read_text())["key"],
                                      "decisions": {"plan": {"mode": "sideways", "stage": 1, "workers": 0}}})):
        path.write_text(junk)
        write_path.reset()
        before = len(timed)
        assert write_path.plan_for(dst).source == "measured" and len(timed) == before + 5
        assert json.loads(path.read_text())["decisions"]["plan"]["mode"] == "direct"


def test_the_stages_stay_within_the_staging_budget_on_any_core_count(probing):
    """More workers get smaller stages, not more memory (peak RSS target of a same-dtype conversion: 256 MB); a
    cached plan over the budget (an older pgconv's, another machine's) is measured again."""
    for workers in range(1, 65):
        stage = write_path.stage_for(workers)
        assert stage % write_path.BLOCK == 0 and 0 < stage <= 32 << 20
        assert stage * workers <= write_path.STAGING_BUDGET
    assert write_path.stage_for(5) == 32 << 20 and write_path.stage_for(8) == 20 << 20
    assert all(p.stage * p.workers <= write_path.STAGING_BUDGET for p in write_path.CONFIGS)
    dst, _, timed = probing
    write_path.plan_for(dst)
    (path,) = (dst.parent / "cache" / "tuning").glob("writer-*.json")
    entry = json.loads(path.read_text())
    entry["decisions"]["plan"].update(stage=32 << 20, workers=8)
    path.write_text(json.dumps(entry))
    write_path.reset()
    before = len(timed)
    plan = write_path.plan_for(dst)
    assert plan.source == "measured" and len(timed) == before + 5


def test_pgconv_writer_forces_a_path(tmp_path, monkeypatch):
    monkeypatch.setattr(write_path, "_time_write", lambda d, p, **k: pytest.fail("probed"))
    for mode in ("direct", "buffered"):
        monkeypatch.setenv("PGCONV_WRITER", mode)
        assert write_path.plan_for(tmp_path, stage=4096, workers=2) == Plan(mode, 4096, 2, "forced")
    monkeypatch.setenv("PGCONV_WRITER", "fast")
    with pytest.raises(InputError, match="PGCONV_WRITER='fast': expected auto, direct or buffered"):
        write_path.plan_for(tmp_path)


def test_the_real_probe_writes_durably_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("PGCONV_WRITER", "auto")
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(write_path, "PROBE_BYTES", 6 * 4096)
    monkeypatch.setattr(write_path, "CONFIGS", [Plan("direct", 2 * 4096, 4), Plan("buffered", 4096, 3)])
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    write_path.reset()
    (tmp_path / "dst").mkdir()
    plan = write_path.plan_for(tmp_path / "dst")
    assert plan.source == "measured" and len(plan.rates) == 3 and all(r > 0 for r in plan.rates.values())
    assert len(synced) == 3 and list((tmp_path / "dst").iterdir()) == []
    key = write_path._fs_key(tmp_path / "dst")
    assert key["fstype"] != "unknown" and key["st_dev"] == os.stat(tmp_path).st_dev
    write_path.reset()
    assert tuning.Decisions("writer", key).get("plan")["mode"] == plan.mode


def test_buffered_must_beat_direct_by_the_buffered_margin(probing):
    """A short buffered probe overstates what buffered writes sustain at checkpoint sizes (page-cache absorption):
    2x faster in the probe is not enough to leave O_DIRECT."""
    dst, seconds, _ = probing
    seconds.update({_name("buffered", SMALL): 0.5, _name("buffered", SMALL, 2): 0.45})
    assert write_path.plan_for(dst).mode == "direct"
