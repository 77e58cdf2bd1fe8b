"""`benchmarks/serve.py` at a tiny size, so that the load benchmark never rots: it builds a tiny model,
times `generate` directly, starts `python -m blip2_jax.serve` as a subprocess, loads it with 1 and 2
clients and prints its table."""
import json
import os
import subprocess
import sys

from tests.helpers import subprocess_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_benchmark_runs_at_tiny_size(tmp_path):
    out = tmp_path / "rows.json"
    args = [sys.executable, os.path.join(REPO, "benchmarks", "serve.py"), "--size=tiny", "--clients=1,2",
            "--requests=4", "--seconds=60", "--max_new_tokens=4", "--max_batch=2", "--direct=2",
            "--startup_timeout=300", f"--json={out}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}
    run = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| mode | clients | requests | p50 ms | p99 ms | captions/s |" in run.stdout
    result = json.loads(out.read_text())
    direct, *levels = result["rows"]
    assert direct["requests"] == 2 and direct["captions_per_s"] > 0
    assert [r["clients"] for r in levels] == [1, 2]
    for r in levels:
        counts = (r["requests"], r["busy"], r["errors"], r["compiles_after_warmup"], r["mismatches"])
        assert counts == (4, 0, 0, 0, 0), r
        assert r["p50_ms"] <= r["p99_ms"]
    assert result["buckets"] == 2 and result["server_exit"] == 0  # batch buckets 1 and 2; SIGTERM exits 0
