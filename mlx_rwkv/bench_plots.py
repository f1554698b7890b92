"""PNG plots of benchmark records (matplotlib, the `bench` extra): the sync experiment, tok/s
against model size with the device's bandwidth roofline, and decode tok/s against context.

    paths = plot_results(doc, out_dir, stem, force=False)   # doc: a results file's JSON

Each plot is drawn only when the records it needs are there; an existing PNG is not replaced
without force.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .bench_records import STRATEGIES, strategy_label
from .config import SHAPES, config_for_shape
from .output_files import check_output



def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'mlx-rwkv[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _decode(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("mode") == "decode" and "tok_s" in r]


def plot_sync(doc: dict[str, Any], path: Path) -> bool:
    """Decode tok/s of each strategy (bars, log scale) for every (shape, precision) measured
    with more than one strategy at context 0; the syncs per token are written on the bars."""
    rows = [r for r in _decode(doc["records"]) if not r.get("context") and r["strategy"] in STRATEGIES]
    models = sorted({(r["shape"], r["precision"]) for r in rows}, key=_model_order)
    models = [m for m in models if len({strategy_label(r) for r in rows if (r["shape"], r["precision"]) == m}) > 1]
    if not models:
        return False
    # each strategy, and beside it the same with decode in one launch per layer where measured
    labels = [label for _, label in sorted({(STRATEGIES.index(r["strategy"]), strategy_label(r)) for r in rows})]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(models) + 2), 4.5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        for i, model in enumerate(models):
            rec = next((r for r in rows if (r["shape"], r["precision"]) == model and strategy_label(r) == label), None)
            if rec is None:
                continue
            x = i + (j - (len(labels) - 1) / 2) * width
            ax.bar(x, rec["tok_s"], width, color=f"C{j}", label=label)
            if rec.get("syncs_per_token") is not None:
                ax.text(x, rec["tok_s"], f"{rec['syncs_per_token']:g}", ha="center", va="bottom", fontsize=6)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per strategy
    ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=2)
    ax.set_xticks(range(len(models)), [f"{s} {p}" for s, p in models])
    ax.set_yscale("log")
    ax.set_ylabel("decode tok/s (batch 1)")
    ax.set_title(f"Where the host waits: decode by sync strategy (numbers: syncs/token)\n{_source(doc)}", fontsize=9)
    return _save(fig, plt, path)


def plot_size(doc: dict[str, Any], path: Path) -> bool:
    """Decode tok/s against model size (real shapes) per engine and precision, best strategy
    of each, at context 0, with the roofline bandwidth / bytes per token of each precision."""
    from .benchmark import weight_bytes_per_token

    rows = [r for r in _decode(doc["records"]) if not r.get("context") and r["shape"] in SHAPES]
    best: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["engine"], r["precision"], r["shape"])
        if key not in best or r["tok_s"] > best[key]["tok_s"]:
            best[key] = r
    series = sorted({(e, p) for e, p, _ in best})
    if not any(len([k for k in best if k[:2] == s]) > 1 for s in series):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = list(SHAPES)
    for i, (engine, precision) in enumerate(series):
        points = sorted((order.index(s), best[(engine, precision, s)]["tok_s"]) for e, p, s in best
                        if (e, p) == (engine, precision))
        ax.plot(*zip(*points), "o-", color=f"C{i}", label=f"{engine} {precision}")
    bandwidth = doc.get("bandwidth_gb_s")
    if bandwidth:
        for i, precision in enumerate(sorted({p for _, p in series})):
            roof = [bandwidth * 1e9 / weight_bytes_per_token(config_for_shape(s), precision) for s in order]
            ax.plot(range(len(order)), roof, "--", color="gray", alpha=0.4 + 0.3 * i,
                    label=f"roofline {precision} ({bandwidth:.0f} GB/s copy)")
    ax.set_xticks(range(len(order)), order)
    ax.set_yscale("log")
    ax.set_xlabel("model (synthetic weights, real shapes)")
    ax.set_ylabel("decode tok/s (batch 1, best strategy)")
    ax.legend(fontsize=7)
    ax.set_title(f"Decode against model size\n{_source(doc)}", fontsize=9)
    return _save(fig, plt, path)


def plot_context(doc: dict[str, Any], path: Path) -> bool:
    """Decode tok/s against the tokens of context before it, per (engine, shape, precision)."""
    rows = [r for r in _decode(doc["records"]) if r.get("context") is not None]
    series = sorted({_series(r) for r in rows})
    series = [s for s in series if len({r["context"] for r in rows if _series(r) == s}) > 1]
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for i, s in enumerate(series):
        points = sorted({r["context"]: r["tok_s"] for r in rows if _series(r) == s}.items())  # last per context
        ax.plot(*zip(*points), "o-", color=f"C{i}", label=" ".join(s))
        top = max(top, *(tok_s for _, tok_s in points))
    contexts = sorted({r["context"] for r in rows if _series(r) in series})
    ax.set_xscale("symlog", linthresh=1024)
    ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 and c % 1024 == 0 else str(c) for c in contexts])
    ax.set_ylim(0, top * 1.15)
    ax.set_xlabel("tokens of context before decoding")
    ax.set_ylabel("decode tok/s (batch 1)")
    ax.legend(fontsize=7)
    ax.set_title(f"Decode after a long context: an RNN's step does not grow\n{_source(doc)}", fontsize=9)
    return _save(fig, plt, path)


PLOTS = {"sync": plot_sync, "size": plot_size, "context": plot_context}


def plot_paths(out_dir: str | Path, stem: str, force: bool = False) -> dict[str, Path]:
    """`<out_dir>/<stem>-<name>.png` for every plot; OutputError if one exists and not force."""
    paths = {name: Path(out_dir) / f"{stem}-{name}.png" for name in PLOTS}
    for path in paths.values():
        check_output(path, force)
    return paths


def plot_results(doc: dict[str, Any], out_dir: str | Path, stem: str, force: bool = False) -> list[Path]:
    """Every plot the records allow (see plot_paths); returns the paths written."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [path for name, path in plot_paths(out_dir, stem, force).items() if PLOTS[name](doc, path)]


def _series(r: dict) -> tuple[str, str, str, str]:
    return r["engine"], r["shape"], r["precision"], strategy_label(r)


def _model_order(model: tuple[str, str]) -> tuple[int, str, str]:
    shape = model[0].split("-")[0]
    return (list(SHAPES).index(shape) if shape in SHAPES else len(SHAPES), *model)


def _source(doc: dict[str, Any]) -> str:
    return f"{doc.get('device', '?')}, {doc.get('date', '?')}"


def _save(fig, plt, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    """`python -m mlx_rwkv.bench_plots RESULTS [--force]`: the plots of a results file, next to
    it (`<file stem>-sync.png`, ...); RESULTS may be a directory: this device's file of today."""
    import argparse

    from .bench_records import read_results, results_path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("results", type=Path, help="a <device>-<date>.json results file, or the directory of today's")
    ap.add_argument("--force", action="store_true", help="replace existing PNGs")
    args = ap.parse_args(argv)
    path = results_path(args.results) if args.results.is_dir() else args.results
    try:
        for path in plot_results(read_results(path), path.parent, path.stem, args.force):
            print(f"wrote {path}")
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
