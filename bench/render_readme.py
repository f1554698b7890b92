"""Render the README's result tables from the JSON records, so every number there is a record.

    python -m bench.render_readme                 # print the Markdown
    python -m bench.render_readme --update        # replace README.md's results region
    python -m bench.render_readme bench/results/nvidia-h100-80gb-hbm3-2026-12-06.json

Each table comes from the newest results file (by date) that has its records, and says which
device, date and command it comes from; the plots of that file (`<stem>-sync.png`, ...) are
embedded where they exist. The region is the text between `<!-- results:start -->` and
`<!-- results:end -->` in README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from mlx_rwkv.bench_records import STRATEGIES, read_results, strategy_label
from mlx_rwkv.benchmark import MATRIX_BYTES, weight_bytes_per_token
from mlx_rwkv.config import SHAPES, config_for_shape
from mlx_rwkv.output_files import OutputError

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
Doc = dict[str, Any]


def load_docs(paths: list[Path]) -> list[tuple[Path, Doc]]:
    """The results files among `paths` (others, e.g. the tokenizer benchmark's, are skipped),
    newest first."""
    docs = []
    for path in paths:
        try:
            docs.append((path, read_results(path)))
        except OutputError:
            continue
    return sorted(docs, key=lambda pd: (pd[1].get("date", ""), pd[0].name), reverse=True)


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def _decode(doc: Doc, context: int | None = 0, batch: int | None = 1) -> list[dict]:
    return [r for r in doc["records"] if r.get("mode") == "decode" and "tok_s" in r
            and (context is None or (r.get("context") or 0) == context)
            and (batch is None or r.get("batch", 1) == batch)]


def _rate(r: dict) -> str:
    """A record's tok/s; marked (x)* when it carries a note (printed under the table)."""
    return f"({_num(r['tok_s'])})*" if r.get("note") else _num(r["tok_s"])


def _with_notes(text: str, rows: list[dict]) -> str:
    return text + "".join(f"\n\n\\* {note}" for note in sorted({r["note"] for r in rows if r.get("note")}))


def _model_key(r: dict) -> tuple:
    shape = r["shape"].split("-")[0]
    return (list(SHAPES).index(shape) if shape in SHAPES else len(SHAPES), r["shape"], r["precision"])


def _num(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "" if x is None else fmt.format(x)


def sync_table(doc: Doc) -> str | None:
    """Every strategy of each model measured with several, with its rate against the best."""
    rows = [r for r in _decode(doc) if r["strategy"] in STRATEGIES]
    models = sorted({_model_key(r) for r in rows})
    out, shown = [], []
    for model in models:
        mine = sorted((r for r in rows if _model_key(r) == model),
                      key=lambda r: (STRATEGIES.index(r["strategy"]), strategy_label(r)))
        if len({strategy_label(r) for r in mine}) < 2:
            continue
        best = max(r["tok_s"] for r in mine)
        shown += mine
        out += [[r["shape"], r["precision"], strategy_label(r), r["engine"], _rate(r),
                 f"{r['tok_s'] / best:.2f}", _num(r.get("syncs_per_token"), "{:g}"),
                 _num(r.get("kernels_per_token"), "{:g}")] for r in mine]
    if not out:
        return None
    return _with_notes(table(["shape", "precision", "strategy", "engine", "decode tok/s", "vs best", "syncs/token",
                              "kernels/token"], out), shown)


def size_table(doc: Doc) -> str | None:
    """The best decode rate of each engine and precision per real shape, with the bytes of
    weights it streams per second and the fraction of the measured copy bandwidth."""
    best: dict[tuple, dict] = {}
    for r in _decode(doc):
        if r["shape"] in SHAPES and r["precision"] in MATRIX_BYTES:
            key = (*_model_key(r), r["engine"])
            if key not in best or r["tok_s"] > best[key]["tok_s"]:
                best[key] = r
    if len({k[1] for k in best}) < 2:
        return None
    rows = []
    for key in sorted(best):
        r = best[key]
        gb_s = r["tok_s"] * weight_bytes_per_token(config_for_shape(r["shape"]), r["precision"]) / 1e9
        rows.append([r["shape"], r["precision"], r["engine"], strategy_label(r), _rate(r), _num(gb_s, "{:,.0f}"),
                     _num(r.get("roofline_fraction"), "{:.1%}"), _num(r.get("peak_memory_mb"), "{:,.0f}")])
    return _with_notes(table(["shape", "precision", "engine", "strategy", "decode tok/s", "weights GB/s",
                              "of copy bandwidth", "peak MB"], rows), list(best.values()))


def batch_table(doc: Doc) -> str | None:
    """Aggregate decode tok/s of B sequences at once, against B = 1 of the same model and strategy."""
    series: dict[tuple, dict[int, dict]] = {}
    for r in _decode(doc, 0, None):
        if r["engine"] == "mlx":
            series.setdefault((*_model_key(r), strategy_label(r)), {})[r.get("batch", 1)] = r
    series = {k: v for k, v in series.items() if len(v) > 1 and 1 in v}
    if not series:
        return None
    rows = [[key[1], key[2], key[3], str(b), _rate(r), f"{r['tok_s'] / by_batch[1]['tok_s']:.1f}x",
             _num(r.get("kernels_per_token"), "{:g}")]
            for key, by_batch in sorted(series.items()) for b, r in sorted(by_batch.items())]
    return _with_notes(table(["shape", "precision", "strategy", "batch", "decode tok/s (all sequences)", "vs batch 1",
                              "kernels/token"], rows), [r for v in series.values() for r in v.values()])


def context_table(doc: Doc) -> str | None:
    """Decode tok/s after each context length, one row per model and strategy."""
    rows = [r for r in _decode(doc, None) if r.get("context") is not None]
    series: dict[tuple, dict[int, float]] = {}
    for r in rows:
        series.setdefault((*_model_key(r), r["engine"], strategy_label(r)), {})[r["context"]] = r["tok_s"]
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    contexts = sorted({c for v in series.values() for c in v})
    out = [[k[1], k[2], k[4], *(_num(v.get(c)) for c in contexts)] for k, v in sorted(series.items())]
    return table(["shape", "precision", "strategy", *(f"decode tok/s after {_tokens(c)}" for c in contexts)], out)


def prefill_table(doc: Doc) -> str | None:
    """Prefill rate and MLX peak memory per model and prompt length."""
    rows = sorted((r for r in doc["records"] if r.get("mode") == "prefill" and r.get("engine") == "mlx"
                   and "tok_s" in r), key=lambda r: (_model_key(r), r["tokens"]))
    if not rows:
        return None
    return _with_notes(table(["shape", "precision", "prompt tokens", "chunk", "prefill tok/s", "peak MB"],
                             [[r["shape"], r["precision"], _tokens(r["tokens"]), str(r.get("chunk_size", "")), _rate(r),
                               _num(r.get("peak_memory_mb"), "{:,.0f}")] for r in rows]), rows)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


SECTIONS: list[tuple[str, str, Callable[[Doc], str | None], str | None]] = [
    ("The sync experiment", "Decode (batch 1) of one model with each sync strategy, same weights and tokens.",
     sync_table, "sync"),
    ("Model size", "Best decode strategy per engine and precision; peak memory is MLX's.", size_table, "size"),
    ("Batched decode", "B sequences decoded at once through the same kernels (the server's step).",
     batch_table, None),
    ("Context length", "Decode after prefilling N tokens: the state is constant in size.", context_table, "context"),
    ("Prefill and memory", "Prefill from a zero state in chunks; peak memory is MLX's whole process.",
     prefill_table, None),
]


def render(docs: list[tuple[Path, Doc]], link_root: Path = ROOT) -> str:
    """The results region: one section per table, from the newest file that has its records."""
    parts = []
    for title, note, make, plot in SECTIONS:
        for path, doc in docs:
            text = make(doc)
            if text is None:
                continue
            source = (f"_{doc.get('device', '?')}, {doc.get('date', '?')}, "
                      f"copy bandwidth {doc.get('bandwidth_gb_s') or '?'} GB/s; `{doc.get('command', '?')}`; "
                      f"records: `{_relative(path, link_root)}`._")
            parts.append(f"#### {title}\n\n{note} {source}\n\n{text}")
            png = path.with_name(f"{path.stem}-{plot}.png") if plot else None
            if png is not None and png.exists():
                parts.append(f"![{title}]({_relative(png, link_root)})")
            break
    if not any("apple" in doc.get("device", "").lower() for _, doc in docs):
        parts.append("No Apple silicon (MLX-Metal) figure has been measured yet: these tables come from the "
                     "devices named above.")
    return "\n\n".join(parts) + "\n"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def update_readme(readme: Path, region: str) -> None:
    """Replace the text between the markers (kept) with `region`."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"error: {readme} needs one {START} ... {END} region")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{region}{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="results files (default: every bench/results/*.json)")
    ap.add_argument("--update", action="store_true", help="replace the results region of README.md")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to update")
    args = ap.parse_args(argv)
    docs = load_docs(args.files or sorted(RESULTS_DIR.glob("*.json")))
    if not docs:
        raise SystemExit("error: no results files")
    region = render(docs)
    if args.update:
        update_readme(args.readme, region)
        print(f"updated {args.readme}", file=sys.stderr)
    else:
        print(region, end="")


if __name__ == "__main__":
    main()
