"""pgconv.tuning.measure with a fake timer: fastest call, interleaving, early drop of hopeless candidates, the budget."""

from __future__ import annotations

import re
import subprocess

import pytest

from pgconv import tuning


@pytest.fixture
def fake(monkeypatch):
    state = {"now": 0.0, "log": []}
    monkeypatch.setattr(tuning, "clock", lambda: state["now"])

    def kernel(name, *costs):
        it = iter(costs)

        def run():
            state["now"] += next(it, costs[-1])
            state["log"].append(name)
        return run
    state["kernel"] = kernel
    return state


def test_the_fastest_timed_call_after_the_warm_up_counts(fake):
    k = fake["kernel"]
    times = tuning.measure({"a": k("a", 9.0, 3.0, 5.0, 3.0, 1.0, 3.0), "b": k("b", 9.0, 2.5)}, reps=5, budget_s=1e9)
    assert times == {"a": 1.0, "b": 2.5}  # the 9 s warm-ups and the slow (interrupted) calls do not count
    assert fake["log"][:2] == ["a", "b"] and fake["log"][2:6] == ["a", "b", "a", "b"]  # interleaved rounds


def test_a_hopeless_candidate_stops_being_timed_and_the_budget_ends_the_rounds(fake):
    k = fake["kernel"]
    times = tuning.measure({"fast": k("fast", 1.0), "slow": k("slow", 10.0)}, reps=5, budget_s=1e9)
    assert times == {"fast": 1.0, "slow": 10.0} and fake["log"].count("slow") == 2  # warm-up + one timed call
    fake["log"].clear()
    times = tuning.measure({"fast": k("fast", 1.0), "slower": k("slower", 3.0)}, reps=5, budget_s=1e9)
    assert fake["log"].count("slower") == 1 + 3  # 3x: timed for 3 rounds before it is dropped
    fake["log"].clear()
    times = tuning.measure({"a": k("a", 1.0), "b": k("b", 1.5)}, reps=50, budget_s=6.0)
    assert fake["log"].count("a") == 3  # warm-ups (to 2.5 s), rounds to 5 s and 7.5 s: past the 6 s budget


def test_a_candidate_that_raises_is_left_out(fake):
    def broken():
        raise RuntimeError("no kernel for this dtype")
    assert tuning.measure({"ok": fake["kernel"]("ok", 1.0), "broken": broken}) == {"ok": 1.0}


def test_decisions_merge_with_what_another_process_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path))
    a, b = tuning.Decisions("kernels", {"cpu": "x"}), tuning.Decisions("kernels", {"cpu": "x"})
    assert a.path == b.path and a.get("s1") is None and b.get("s2") is None
    a.put("s1", {"kernel": "aten"})
    b.put("s2", {"kernel": "onednn"})  # b re-reads before writing: a's decision survives
    assert tuning.Decisions("kernels", {"cpu": "x"}).get("s1") == {"kernel": "aten"}
    assert tuning.Decisions("kernels", {"cpu": "y"}).path != a.path
    assert not list(tmp_path.glob("tuning/.*"))  # no temporary left behind


def test_the_cpu_label_names_family_and_model_where_the_model_string_is_vague(monkeypatch):
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n" \
           "stepping\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    zen5 = zen4.replace("cpu family\t: 25", "cpu family\t: 26").replace("model\t\t: 17", "model\t\t: 2")
    labels = []
    for text in (zen4, zen5):
        monkeypatch.setattr(tuning, "_cpuinfo", lambda text=text: text)
        assert tuning.cpu_model() == "AMD EPYC" and tuning.cpu_isa() == ["avx2", "avx512f", "avx512_bf16"]
        labels.append(tuning.cpu_label())
    assert labels == ["AMD EPYC (family 25 model 17 stepping 1)", "AMD EPYC (family 26 model 2 stepping 1)"]
    monkeypatch.setattr(tuning, "_cpuinfo", lambda: "")  # no /proc/cpuinfo: the platform's name, no signature
    assert tuning.cpu_signature() == "" and tuning.cpu_label() == tuning.cpu_model()


def test_between_runs_before_every_timed_call_and_is_not_timed(fake):
    calls = []

    def between():
        fake["now"] += 100.0  # an eviction that takes ages must not count
        calls.append(fake["log"][-1] if fake["log"] else None)
    times = tuning.measure({"a": fake["kernel"]("a", 1.0), "b": fake["kernel"]("b", 2.0)}, reps=3, budget_s=1e9,
                           between=between)
    assert times == {"a": 1.0, "b": 2.0}
    assert len(calls) == 6  # 3 rounds x 2 candidates; warm-up calls get none


def test_last_level_cache_size_is_read_from_sysfs():
    size = tuning.last_level_cache_bytes()
    assert size >= 1 << 20 and size % 1024 == 0
    try:  # lscpu's reading of the same caches (per instance), an independent oracle where it is installed
        text = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return
    per_instance = [int(b) // int(n) for b, n in re.findall(r"^L\d\w* cache:\s+(\d+) \((\d+) instances?\)", text, re.M)]
    if per_instance:
        assert size == max(per_instance)
