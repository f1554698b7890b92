"""`mlx-rwkv bench` on the CPU with a tiny model: the table, the JSON records (DESIGN.md's format),
the sync counts each strategy implies, merging and refusals, plots, the README renderer, and
(on a wgpu adapter) the hybrid strategy against the one-submit WebGPU engine."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import render_readme
from mlx_rwkv import bench_cli, cli
from mlx_rwkv import model as model_module
from mlx_rwkv.config import ModelConfig
from mlx_rwkv.matvec import ProjectionGroup
from mlx_rwkv.synth import synthesize

LAYERS = 2
TINY = ["--layers", str(LAYERS), "--embd", "256", "--vocab", "512", "--decode-steps", "2", "--slow-steps", "1",
        "--repeats", "1"]
FIELDS = {"engine", "shape", "precision", "mode", "strategy", "batch", "tokens", "tok_s", "tok_s_spread",
          "kernels_per_token", "syncs_per_token", "peak_memory_mb", "roofline_fraction"}
OPS_PER_LAYER = 8  # norm_mix, att_in, lora_up, wkv7, att_out, norm_mix, ffn_key, ffn_value (model.py)
TINY_CONFIG = ModelConfig(n_layer=2, n_embd=256, head_size=64, vocab_size=300, d_decay=32, d_aaa=32, d_mv=16,
                          d_gate=64, d_ffn=1024)


def bench(argv: list[str], capsys) -> tuple[str, str]:
    """`mlx-rwkv bench ARGV`: (stdout, stderr)."""
    cli.main(["bench", *argv])
    out = capsys.readouterr()
    return out.out, out.err


def only_file(directory: Path) -> dict:
    (path,) = directory.glob("*.json")
    return json.loads(path.read_text())


def test_mlx_strategies_table_and_records(tmp_path, capsys):
    out, _ = bench([*TINY, "--engines", "mlx", "--precisions", "f16", "q4k", "--strategies", "whole-pass",
                    "per-layer", "per-op", "--contexts", "0", "40", "--prefill-tokens", "24", "--chunk-size", "16",
                    "--write", "--results-dir", str(tmp_path)], capsys)
    lines = out.strip().splitlines()
    assert lines[0].startswith("| engine | strategy | shape |") and lines[1].startswith("|---|")
    doc = only_file(tmp_path)
    assert {"device", "date", "command", "versions", "bandwidth_gb_s", "records"} <= set(doc)
    assert doc["command"].startswith("mlx-rwkv bench ") and "--strategies whole-pass per-layer per-op" in doc["command"]
    assert "mlx" in doc["versions"] and doc["bandwidth_gb_s"] > 0
    records = doc["records"]
    assert len(lines) == 2 + len(records)
    for r in records:
        assert FIELDS <= set(r), set(FIELDS) - set(r)
        assert r["engine"] == "mlx" and r["batch"] == 1 and r["tok_s"] > 0
        assert r["tok_s_spread"][0] <= r["tok_s"] <= r["tok_s_spread"][1]
        assert r["shape"] == "0.1B-L2-C256-V512" and r["weights"] == "synthetic"
    for precision in ("f16", "q4k"):
        decode = {(r["strategy"], r["context"]): r for r in records
                  if r["mode"] == "decode" and r["precision"] == precision}
        # the context sweep decodes with the compiled step
        assert set(decode) == {("whole-pass", 0), ("per-layer", 0), ("per-op", 0), ("compiled", 0), ("compiled", 40)}
        # waits per token: one for the token, plus one per layer, or one per op and the head
        assert decode["whole-pass", 0]["syncs_per_token"] == decode["compiled", 40]["syncs_per_token"] == 1
        assert decode["per-layer", 0]["syncs_per_token"] == LAYERS + 1
        assert decode["per-op", 0]["syncs_per_token"] == OPS_PER_LAYER * LAYERS + 2
        kernels = {decode[s, 0]["kernels_per_token"] for s in ("whole-pass", "per-layer", "per-op")}
        assert len(kernels) == 1  # one graph, counted the same way
        assert OPS_PER_LAYER * LAYERS < decode["compiled", 0]["kernels_per_token"] <= min(kernels)  # fused
        prefill = sorted(r["tokens"] for r in records if r["mode"] == "prefill" and r["precision"] == precision)
        assert prefill == [24, 40]  # the timed prefill and the context sweep's
    # rerunning merges: a record of the same key replaces the older one
    bench([*TINY, "--engines", "mlx", "--precisions", "f16", "--strategies", "whole-pass", "--write",
           "--results-dir", str(tmp_path)], capsys)
    again = only_file(tmp_path)["records"]
    assert len(again) == len(records)


def test_cpu_float32_runs_whole_pass_only(tmp_path, capsys):
    """The CPU float32 forward is one numpy pass: no MLX graph to compile or evaluate in parts."""
    _, err = bench([*TINY, "--engines", "mlx", "--precisions", "f32", "--strategies", "compiled", "whole-pass",
                    "per-op", "--write", "--results-dir", str(tmp_path)], capsys)
    (rec,) = only_file(tmp_path)["records"]
    assert rec["strategy"] == "whole-pass" and rec["kernels_per_token"] is None
    assert "compiled, per-op skipped" in err


def test_foreign_file_is_not_replaced_without_force(tmp_path, capsys):
    argv = [*TINY, "--engines", "mlx", "--precisions", "f16", "--strategies", "whole-pass", "--write",
            "--results-dir", str(tmp_path)]
    bench(argv, capsys)
    (path,) = tmp_path.glob("*.json")
    path.write_text("my notes")
    with pytest.raises(SystemExit, match="not a benchmark results file.*--force"):
        bench(argv, capsys)
    assert path.read_text() == "my notes"
    bench([*argv, "--force"], capsys)
    assert len(json.loads(path.read_text())["records"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--embd", "320", "--precisions", "q4k"], "q4k needs C to be a multiple of 256"),
    (["--engines", "webgpu", "--contexts", "4k"], "add mlx to --engines"),
    (["--engines", "mlx", "--strategies", "hybrid"], "nothing to run"),
])
def test_impossible_combinations_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", *TINY[:6], *argv])


def test_token_counts_take_a_k_suffix():
    assert bench_cli.token_count("64k") == 65536 and bench_cli.token_count("0") == 0


def test_eval_hook_restores_the_model(capsys):
    from mlx_rwkv.benchmark import synthetic_weights
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.sync_strategies import EvalHook

    hooked = lambda: (model_module.wkv7_lora, ProjectionGroup.__call__, ProjectionGroup.after_norm)  # noqa: E731
    originals = hooked()
    model = build_model(synthetic_weights(TINY_CONFIG, "f16"), TINY_CONFIG, "float16")
    with EvalHook(model, "layer") as hook:
        model.forward([1, 2, 3])
        assert all(now is not before for now, before in zip(hooked(), originals))
    assert hook.syncs == TINY_CONFIG.n_layer
    assert hooked() == originals


def test_plots_and_readme_render(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = [*TINY, "--engines", "mlx", "--precisions", "f16", "--strategies", "whole-pass", "per-layer",
            "--contexts", "0", "32", "--chunk-size", "16", "--write", "--plot", "--results-dir", str(tmp_path)]
    _, err = bench(argv, capsys)
    pngs = sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.glob("*.png"))
    assert pngs == ["context.png", "sync.png"], err
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="exists: not replaced"):  # refused before measuring
        bench(argv, capsys)
    region = render_readme.render(render_readme.load_docs(list(tmp_path.glob("*.json"))), tmp_path)
    assert "#### The sync experiment" in region and "#### Context length" in region
    assert "| 0.1B-L2-C256-V512 | f16 | per-layer | mlx |" in region and "-sync.png)" in region
    assert "No Apple silicon" in region
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render_readme.START}\nold\n{render_readme.END}\nrest\n")
    render_readme.update_readme(readme, region)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{render_readme.END}\nrest\n")
    assert "old" not in text and region in text


@pytest.fixture(scope="module")
def wgpu_adapter():
    from mlx_rwkv.benchmark import webgpu_available

    name = webgpu_available()
    if name is None:
        pytest.skip("no wgpu adapter")
    return name


@pytest.mark.webgpu
def test_hybrid_logits_equal_the_one_submit_engine(wgpu_adapter):
    from mlx_rwkv.quant import quantize_model
    from mlx_rwkv.sync_strategies import Hybrid
    from webgpu_ref import WebGPUModel

    weights = quantize_model(synthesize(TINY_CONFIG, seed=3), progress=False)
    model = WebGPUModel.from_weights(weights, TINY_CONFIG, prefill_chunk=4)
    tokens = [5, 17, 200, 3, 99, 42]
    state, reference = model.new_state(), []
    for t in tokens:
        logits, state = model.forward([t], state)
        reference.append(logits)
    prefill_reference, _ = model.forward(tokens, all_logits=True)  # chunks of 4: the tiled matmuls

    hybrid = Hybrid(model)
    assert hybrid.handed_off == 4 * TINY_CONFIG.n_layer + 1  # r/k/v, output, ffn key, ffn value; the head
    with hybrid:
        state = model.new_state()
        for t, want in zip(tokens, reference):
            logits, state = model.forward([t], state)
            np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert hybrid.syncs == 2 * hybrid.handed_off * len(tokens)  # read-back + MLX eval per handed-off op
        prefill, _ = model.forward(tokens, all_logits=True)
    np.testing.assert_allclose(prefill, prefill_reference, rtol=1e-4, atol=1e-4 * np.abs(prefill_reference).max())
    assert not model.host_ops  # the engine is itself again
    np.testing.assert_array_equal(model.forward(tokens[:1])[0], reference[0])


@pytest.mark.webgpu
def test_bench_records_webgpu_and_hybrid(wgpu_adapter, tmp_path, capsys):
    bench([*TINY, "--precisions", "q4k", "--engines", "webgpu", "hybrid", "--write", "--results-dir", str(tmp_path)],
          capsys)
    records = {r["strategy"]: r for r in only_file(tmp_path)["records"]}
    assert set(records) == {"webgpu-one-submit", "webgpu-per-op", "hybrid"}
    dispatches = records["webgpu-one-submit"]["kernels_per_token"]
    assert records["webgpu-one-submit"]["syncs_per_token"] == 1
    assert records["webgpu-per-op"]["syncs_per_token"] == dispatches + 1
    handed_off = 4 * LAYERS + 1
    assert records["hybrid"]["engine"] == "hybrid"
    assert records["hybrid"]["syncs_per_token"] == 2 * handed_off + 1
    assert records["hybrid"]["kernels_per_token"] >= dispatches  # the WebGPU rest plus MLX's launches


def test_batched_decode_records(tmp_path, capsys):
    """--batches: compiled (CPU: whole-pass) decode of B sequences, aggregate tok/s, one record per B."""
    bench([*TINY, "--engines", "mlx", "--precisions", "f16", "--strategies", "compiled", "--batches", "3",
           "--write", "--results-dir", str(tmp_path)], capsys)
    records = only_file(tmp_path)["records"]
    batched = [r for r in records if r["batch"] == 3]
    assert len(batched) == 1 and batched[0]["mode"] == "decode" and batched[0]["tok_s"] > 0
    assert "--batches 3" in only_file(tmp_path)["command"]


def test_readme_batch_table_and_notes():
    """The batched table: aggregate tok/s per batch against batch 1; a record's note marks its rate
    and is printed under the table; batched records stay out of the batch-1 tables."""
    from mlx_rwkv.bench_records import record

    def rec(batch, rate, **extra):
        return record("mlx", "1.5B", "q4k", "decode", "compiled", batch=batch, tokens=8, rates=[rate], context=0,
                      **extra)

    doc = {"records": [rec(1, 100.0), rec(32, 1000.0, note="a caveat"),
                       record("webgpu", "1.5B", "q4k", "decode", "webgpu-one-submit", tokens=8, rates=[90.0])]}
    text = render_readme.batch_table(doc)
    assert "| 1.5B | q4k | compiled | 32 | (1,000.0)* | 10.0x |" in text and text.endswith("\\* a caveat")
    sync = render_readme.sync_table(doc)
    assert "1,000.0" not in sync and "| 1.5B | q4k | compiled | mlx | 100.0 | 1.00 |" in sync


def test_layer_kernel_records_are_rows_of_their_own(tmp_path):
    """A decode record with the persistent layer kernel (`layer_kernel`: its threadgroups) neither
    replaces nor is replaced by the five-launch record of the same run, and the tables and the
    sync plot name it apart."""
    from mlx_rwkv import bench_plots
    from mlx_rwkv.bench_records import read_results, record, write_results

    def rec(rate, **extra):
        return record("mlx", "1.5B", "q4k", "decode", "compiled", tokens=8, rates=[rate], context=0, **extra)

    write_results([rec(300.0), rec(900.0, layer_kernel=132)], "x", results_dir=tmp_path, bandwidth_gb_s=3000.0)
    path = write_results([rec(310.0)], "x", results_dir=tmp_path)  # a later five-launch run replaces its own row
    doc = read_results(path)
    assert sorted((r["tok_s"], r.get("layer_kernel")) for r in doc["records"]) == [(310.0, None), (900.0, 132)]
    sync = render_readme.sync_table(doc)
    assert "| 1.5B | q4k | compiled | mlx | 310.0 | 0.34 |" in sync
    assert "| 1.5B | q4k | compiled + layer kernel | mlx | 900.0 | 1.00 |" in sync
    pytest.importorskip("matplotlib")
    assert bench_plots.plot_sync(doc, tmp_path / "sync.png") and (tmp_path / "sync.png").stat().st_size > 0
