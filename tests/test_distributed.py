"""`--distributed`'s flags: all three process flags or none, and a mistake is one error line."""
import os
import subprocess
import sys

import pytest

from blip2_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_flags_leave_it_to_the_cluster_and_all_three_are_passed_on():
    assert distributed.initialize_kwargs(None, None, None) == {}
    assert distributed.initialize_kwargs("10.0.0.1:1234", 4, 3) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", None, None), "--coordinator_address=127.0.0.1:1234 needs --num_processes and --process_id"),
    ((None, 2, 0), "--num_processes=2 --process_id=0 needs --coordinator_address"),
    (("localhost", 2, 0), "--coordinator_address=localhost: expected HOST:PORT"),
    (("127.0.0.1:1234", 0, 0), "--num_processes=0: must be >= 1"),
    (("127.0.0.1:1234", 2, 2), r"--process_id=2: must be in \[0, 2\)"),
])
def test_a_bad_combination_names_the_values(args, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize_kwargs(*args)


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2"], "error: --coordinator_address, --num_processes and --process_id need --distributed"),
    (["--distributed", "--process_id=5", "--num_processes=2", "--coordinator_address=127.0.0.1:1"],
     "error: --process_id=5: must be in [0, 2) (--num_processes=2)"),
])
def test_main_says_what_is_wrong_in_one_line(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "blip2_jax.main", "--config=configs/stage1.py:demo",
                           f"--workdir={tmp_path}", *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]


def test_several_cpu_processes_leave_the_compilation_cache_off_unless_asked(monkeypatch):
    """JAX writes the persistent cache from process 0 only: a restarted multi-process CPU run would
    load on process 0 and compile on the others, and gloo times out the first collective."""
    import jax

    from blip2_jax import main

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert main.cache_directory(None) is None and main.cache_directory("/c") == "/c"  # one process: as asked
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert main.cache_directory(None) == ""
    assert main.cache_directory("/c") == "/c"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # other backends: as asked (gloo is CPU only)
    assert main.cache_directory(None) is None
