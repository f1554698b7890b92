"""`mlx-rwkv doctor` (mlx_rwkv/doctor.py): the whole run and its report, planted faults that it
must catch, and the SIMD probe kernel run in the CPU emulator (tests/kernel_emulator.py).

On a GPU host the same tests run the real kernels: there every kernel check must pass.
"""
from __future__ import annotations

import io
import json
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest

from kernel_emulator import emulated_kernels
from mlx_rwkv import doctor, kernels, wkv

ON_GPU = kernels.gpu_backend() is not None


def run(tmp_path) -> tuple[int, str, dict]:
    out = io.StringIO()
    report = tmp_path / "doctor.json"
    code = doctor.run_doctor(report, out)
    return code, out.getvalue(), json.loads(report.read_text())


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_passes_and_reports_every_check(tmp_path):
    code, text, report = run(tmp_path)
    assert code == 0, text
    names = [name for name, _ in doctor.all_checks()]
    checks = by_name(report)
    assert list(checks) == names and len(set(names)) == len(names)
    assert report["ok"] is True and report["summary"]["fail"] == 0
    env = report["environment"]
    assert env["mlx"] == mx.__version__ and env["backend"] == (kernels.gpu_backend() or "cpu")
    assert f"mlx:     {mx.__version__}" in text
    for name, check in checks.items():
        assert check["status"] in ("pass", "skip") and check["seconds"] >= 0
        assert sum(line.split()[1:2] == [name] for line in text.splitlines()) == 1, f"one line for {name}"
        gpu_only = name.startswith(("kernel/", "simd/")) or name == "generation/kernels-vs-reference"
        if gpu_only and not ON_GPU:
            assert check["status"] == "skip" and check["detail"] == "skipped: no GPU backend"
        else:  # the reference paths, the engine here, and on a GPU every kernel
            assert check["status"] == "pass", check
    comparisons = [c for c in checks.values() if c["name"].startswith(("reference/", "kernel/", "model/"))
                   and c["status"] == "pass"]
    assert comparisons and all(0 <= c["max_abs_error"] <= c["tolerance"] for c in comparisons)
    assert "ms per step" in checks["timing/decode-step"]["detail"]


def test_a_wrong_reference_path_fails(tmp_path, monkeypatch):
    """A fault in the engine's pure-MLX WKV path fails reference/wkv7 (and the exit code)."""
    real = wkv.wkv7_reference

    def off_by_a_little(*args):
        y, state = real(*args)
        return y + 0.01, state

    monkeypatch.setattr(wkv, "wkv7_reference", off_by_a_little)
    code, text, report = run(tmp_path)
    check = by_name(report)["reference/wkv7"]
    assert code == 1 and report["ok"] is False
    assert check["status"] == "fail" and check["max_abs_error"] > check["tolerance"], check
    assert "FAIL  reference/wkv7" in text and "FAILED" in text.splitlines()[-2]


def test_a_check_that_raises_is_a_fail_and_the_others_still_run(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("[metal::Device] Unable to build metal library from source\nline 2 of the log")

    monkeypatch.setattr(doctor, "check_reference_q4k", broken)
    code, text, report = run(tmp_path)
    checks = by_name(report)
    assert code == 1
    bad = checks["reference/q4k"]
    assert bad["status"] == "fail"
    assert bad["detail"] == "RuntimeError: [metal::Device] Unable to build metal library from source"
    assert "line 2 of the log" in bad["exception"] and "line 2" not in text
    assert [c["name"] for c in checks.values() if c["status"] == "fail"] == ["reference/q4k"]
    assert checks["generation/vs-prefill"]["status"] == "pass"


def test_report_replaces_atomically(tmp_path):
    """The report is written through a temporary file: no partial file, no leftovers."""
    report = tmp_path / "doctor.json"
    report.write_text("old")
    with mock.patch.object(doctor, "all_checks", lambda: [("reference/wkv7", doctor.check_reference_wkv7)]):
        assert doctor.run_doctor(report, io.StringIO()) == 0
    assert json.loads(report.read_text())["summary"] == {"pass": 1, "fail": 0, "skip": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["doctor.json"]


# ---- the SIMD probe: the verifier, then the kernel body in the emulator ---------------------------

def records_of(threads: int, groups: int, lane, group) -> tuple[np.ndarray, np.ndarray]:
    """The probe's records on a device whose SIMD-groups are {t : group(t) == g}, lanes lane(t)."""
    n = threads * groups
    x = np.arange(n, dtype=np.float32) * 3 + 1
    tid = np.arange(n) % threads
    base = np.arange(n) - tid
    lanes, groups_of = lane(tid), group(tid)
    records = np.zeros((n, doctor.PROBE_FIELDS), np.float32)
    for i in range(n):
        members = base[i] + np.flatnonzero(groups_of[base[i]: base[i] + threads] == groups_of[i])
        by_lane = dict(zip(lanes[members], members))
        records[i, 0] = x[members].sum()
        for j in range(5):
            records[i, 1 + j] = x[by_lane[lanes[i] ^ (1 << j)]]
    return x, records


def test_probe_verifier():
    assert doctor.probe_problems(*records_of(64, 2, lambda t: t % 32, lambda t: t // 32), 64) == []
    # SIMD-groups of every other thread: sums and every shuffle combine other threads
    strided = " ".join(doctor.probe_problems(*records_of(64, 2, lambda t: t // 2, lambda t: t % 2), 64))
    for what in ("simd_sum:", "shuffle_xor 1:", "shuffle_xor 16:"):
        assert what in strided
    # the right SIMD-groups, lanes rotated by one: the sums agree, the shuffles do not (but for
    # xor 16, which is + 16 mod 32 on any rotation)
    rotated = doctor.probe_problems(*records_of(64, 2, lambda t: (t + 1) % 32, lambda t: t // 32), 64)
    assert [p.split(":")[0] for p in rotated] == ["shuffle_xor 1", "shuffle_xor 2", "shuffle_xor 4",
                                                   "shuffle_xor 8"]
    # lanes numbered backwards (tid % 32 ^ 31): no xor shuffle or sum can tell, nor can a kernel
    assert doctor.probe_problems(*records_of(64, 2, lambda t: 31 - t % 32, lambda t: t // 32), 64) == []


@pytest.mark.parametrize("threads", doctor.PROBE_THREADGROUPS)
def test_probe_kernel_emulated(threads):
    with emulated_kernels():
        x, records = doctor.simd_probe(threads)
    assert doctor.probe_problems(np.array(x), np.array(records), threads) == []


def test_probe_check_catches_a_device_whose_shuffles_differ():
    """The probe in the emulator, its xor masks doubled (mod 32): shuffles that pair other lanes."""
    read = kernels.read_source
    assert "SIMD_SHUFFLE_XOR(v, 1u << j)" in read("simd_probe.inc")

    def planted(filename: str) -> str:
        text = read(filename)
        return text.replace("1u << j", "(2u << j) & 31u") if filename == "simd_probe.inc" else text

    with emulated_kernels(), mock.patch.object(kernels, "read_source", planted):
        outcome = doctor.check_simd_lanes()
    assert not outcome.passed and "shuffle_xor 1:" in outcome.detail and "simd_sum" not in outcome.detail


# ---- kernel checks against emulated kernels --------------------------------------------------------

def without_kernels(fn, *args):
    """doctor._reference for the emulator, whose kernels ignore the default device."""
    with mock.patch.object(kernels, "gpu_backend", lambda: None):
        return fn(*args)


def test_kernel_check_passes_on_emulated_kernels(monkeypatch):
    monkeypatch.setattr(doctor, "_reference", without_kernels)
    with emulated_kernels():
        outcome = doctor.check_kernel_norm_mix(mx.float32)
    assert outcome.passed, outcome.detail


def test_kernel_check_catches_a_kernel_returning_garbage(monkeypatch):
    monkeypatch.setattr(doctor, "_reference", without_kernels)

    with emulated_kernels():
        build = kernels._build  # the emulator's

        def garbage(spec, backend):
            real = build(spec, backend)
            return lambda **launch: [out + 0.05 for out in real(**launch)]

        with mock.patch.object(kernels, "_build", garbage):
            outcome = doctor.check_kernel_norm_mix(mx.float32)
    assert not outcome.passed and outcome.max_abs_error > outcome.tolerance


@pytest.mark.parametrize("quant", [False, True])
def test_layer_kernel_check_passes_on_the_emulated_kernels(quant):
    """kernel/layer (how a Mac proves the grid-barrier kernel) with the kernels emulated on the CPU."""
    from kernel_emulator import emulated_kernels

    with emulated_kernels(), mock.patch.object(mx, "compile", lambda f: f):  # the emulator runs eagerly
        outcome = doctor.check_layer_kernel(quant)
    assert outcome.passed and f"{doctor.LAYER_THREADGROUPS} threadgroups" in outcome.detail, outcome
