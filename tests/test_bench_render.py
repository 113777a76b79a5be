"""bench/render.py turns saved results into a Markdown table and plots."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_render", ROOT / "bench" / "render.py")
render = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render)


def fake_run(median_s):
    stats = {"median": median_s, "iqr": median_s / 10, "rounds": 7}
    return {
        "machine_info": {"m2pt": {"device": "Test GPU", "commit": "abcdef0123456789", "date": "2026-11-22T00:00:00Z"}},
        "benchmarks": [{"fullname": "bench/x.py::test_a[ours]", "stats": stats, "extra_info": {"tflops": 1.5}}],
    }


def test_render_report_and_plots(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "2026-11-22-test-gpu-abcdef01.json").write_text(json.dumps(fake_run(0.0123)))
    headline = {
        "device": "Test GPU", "commit": "abcdef0123456789", "date": "2026-11-22T00:00:00Z",
        "ours": {"samples_per_s": 9.0, "tokens_per_s": 6336.0, "peak_mem_bytes": 6 * 2**30, "mfu": 0.5,
                 "max_microbatch_24gib": 32},
        "baseline": {"samples_per_s": 3.0, "tokens_per_s": 2112.0, "peak_mem_bytes": 12 * 2**30, "mfu": 0.2,
                     "max_microbatch_24gib": 12},
    }
    (results / "headline-test-gpu-2026-11-22.json").write_text(json.dumps(headline))
    report = render.render(results, tmp_path / "out")
    text = report.read_text()
    assert "| samples/s | 9.00 | 3.00 | 3.00× |" in text
    assert "| peak memory (GiB) | 6.00 | 12.00 | 0.50× |" in text
    assert "| test_a[ours] | 12.300 | 1.230 | 7 | tflops=1.5 |" in text
    assert (tmp_path / "out" / "headline.png").stat().st_size > 1000
    assert (tmp_path / "out" / "2026-11-22-test-gpu-abcdef01.png").stat().st_size > 1000
