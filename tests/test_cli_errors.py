"""Command-line mistakes end in one `error: ...` line on stderr and a non-zero exit, before any compute
(no traceback): the flags and `--config.x=y` overrides of `blip2_jax.main` and `blip2_jax.evaluate.run`
(blip2_jax/flag_errors.py)."""
import os
import subprocess
import sys

import pytest

from blip2_jax import config_sections, flag_errors


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "blip2_jax.main", f"--workdir={tmp_path / 'w'}", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("override, want", [
    ("--config.train.no_such_field=3", "no field train.no_such_field in the config (fields of train: "),
    ("--config.train.total_step=3", "no field train.total_step in the config; did you mean train.total_steps?"),
    ("--config.train.total_steps=abc", "--config.train.total_steps=abc: expected int for train.total_steps"),
])
def test_bad_override_is_one_line_naming_the_field(tmp_path, override, want):
    out = _main(tmp_path, "--config=configs/stage1.py:demo", override)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], out.stderr[-2000:]
    assert out.stdout == "" and not (tmp_path / "w").exists()


def test_unknown_config_file_and_variant_are_one_line(tmp_path):
    for config, want in [("configs/nope.py", "cannot load the config file ([Errno 2] No such file"),
                         ("configs/stage1.py:nope", "unknown variant 'nope'")]:
        out = _main(tmp_path, f"--config={config}")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and want in lines[0], out.stderr[-2000:]


def test_a_bug_in_get_config_keeps_its_traceback(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from blip2_jax import config_sections\n\n"
                   "def get_config(arg=None):\n    return config_sections.loop_config().no_such_section\n")
    out = _main(tmp_path, f"--config={cfg}", "--config.train.total_steps=3")
    assert out.returncode == 1 and "Traceback" in out.stderr and "no_such_section" in out.stderr


@pytest.mark.parametrize("path, want", [
    ("train.total_steps", None),
    ("optimizer.peak_lr", None),
    ("train.total_step", "did you mean train.total_steps?"),
    ("total_steps", "no field total_steps in the config; did you mean train.total_steps?"),
    ("optimizer.total_steps", "did you mean train.total_steps?"),
    ("trian.total_steps", "no field trian in the config; did you mean train.total_steps?"),
    ("train.total_steps.x", "train.total_steps is a field (int), not a section"),
    ("nosection.x", "no field nosection in the config (fields: mesh, optimizer, seed, task, train)"),
])
def test_unknown_field_message_suggests_the_close_field(path, want):
    got = flag_errors.unknown_field_message(config_sections.loop_config(), path)
    assert got == want if want is None else want in got, got


@pytest.mark.parametrize("args, want", [
    (["--config=configs/eval.py:demo_caption", "--config.generation.num_beam=2"],
     "did you mean generation.num_beams?"),
    ([], "--config is required (a config file, e.g. --config=configs/eval.py:demo_caption)"),
])
def test_evaluation_cli_flag_mistakes_are_one_line(args, want):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "blip2_jax.evaluate.run", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and want in lines[0], out.stderr[-2000:]
