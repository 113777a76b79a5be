"""Render saved benchmark results into a Markdown report and PNG plots.

    python bench/render.py                       # newest GPU results in bench/results/ -> bench/results/report/
    python bench/render.py --results DIR --out DIR

Reads pytest-benchmark JSON files (each carries machine_info.m2pt: device, versions, commit, date)
and headline-*.json files written by the end-to-end bench. Plots are made from the saved data only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADLINE_FIELDS = [
    ("samples_per_s", "samples/s", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("peak_mem_bytes", "peak memory (GiB)", "{:.2f}"),
    ("mfu", "MFU", "{:.3f}"),
    ("max_microbatch_24gib", "max micro-batch in 24 GiB", "{}"),
]


def _fmt(key: str, value, pattern: str) -> str:
    if value is None:
        return "—"
    if key == "peak_mem_bytes":
        value = value / 2**30
    return pattern.format(value)


def headline_table(headline: dict) -> str:
    rows = [f"Device: {headline['device']} · commit {headline['commit'][:10]} · {headline['date']}", "",
            "| figure | ours | baseline | ours ÷ baseline |", "| --- | --- | --- | --- |"]
    for key, label, pattern in HEADLINE_FIELDS:
        ours, base = headline["ours"].get(key), headline["baseline"].get(key)
        numbers = isinstance(ours, (int, float)) and isinstance(base, (int, float))
        ratio = f"{ours / base:.2f}×" if numbers and base else "—"
        rows.append(f"| {label} | {_fmt(key, ours, pattern)} | {_fmt(key, base, pattern)} | {ratio} |")
    return "\n".join(rows)


def benchmark_table(run: dict) -> str:
    info = run["machine_info"].get("m2pt", {})
    rows = [f"Device: {info.get('device', '?')} · commit {str(info.get('commit', '?'))[:10]} · {info.get('date', '?')}",
            "", "| benchmark | median (ms) | IQR (ms) | rounds | details |", "| --- | --- | --- | --- | --- |"]
    for bench in run["benchmarks"]:
        stats = bench["stats"]
        details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in bench.get("extra_info", {}).items())
        rows.append(f"| {bench['fullname'].split('::')[-1]} | {stats['median'] * 1e3:.3f} | "
                    f"{stats['iqr'] * 1e3:.3f} | {stats['rounds']} | {details} |")
    return "\n".join(rows)


def plot_headline(headline: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [(k, label) for k, label, _ in HEADLINE_FIELDS
              if isinstance(headline["ours"].get(k), (int, float))
              and isinstance(headline["baseline"].get(k), (int, float))]
    fig, axes = plt.subplots(1, max(1, len(fields)), figsize=(3.2 * max(1, len(fields)), 3.2))
    axes = axes if len(fields) > 1 else [axes]
    for ax, (key, label) in zip(axes, fields):
        values = [headline["ours"][key], headline["baseline"][key]]
        if key == "peak_mem_bytes":
            values = [v / 2**30 for v in values]
        ax.bar(["ours", "baseline"], values, color=["tab:green", "tab:gray"])
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"M²PT training step — {headline['device']} — {headline['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_benchmarks(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b["fullname"].split("::")[-1] for b in run["benchmarks"]]
    medians = [b["stats"]["median"] * 1e3 for b in run["benchmarks"]]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    ax.barh(names, medians, color="tab:blue")
    ax.set_xlabel("median time (ms)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: Path, out: Path) -> Path:
    """Write out/report.md and its PNGs from the newest headline and benchmark files in `results`."""
    out.mkdir(parents=True, exist_ok=True)
    headlines = sorted(results.glob("headline-*.json"))
    runs = sorted(p for p in results.glob("*.json") if not p.name.startswith("headline-"))
    if not headlines and not runs:
        raise SystemExit(f"no benchmark results in {results}: run `pytest bench/ --benchmark-only` first")
    parts = ["# m2pt-fast benchmark results", ""]
    if headlines:
        headline = json.loads(headlines[-1].read_text())
        plot_headline(headline, out / "headline.png")
        parts += ["## Training step: ours vs baseline", "", headline_table(headline), "",
                  "![headline](headline.png)", ""]
    for run_path in runs:
        run = json.loads(run_path.read_text())
        if not run.get("benchmarks"):
            continue
        png = run_path.stem + ".png"
        plot_benchmarks(run, out / png)
        parts += [f"## {run_path.stem}", "", benchmark_table(run), "", f"![{run_path.stem}]({png})", ""]
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report


def main(argv=None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=here / "results")
    parser.add_argument("--out", type=Path, default=here / "results" / "report")
    args = parser.parse_args(argv)
    print(render(args.results, args.out))


if __name__ == "__main__":
    main()
