"""launch/demo.sh's plumbing, with a stub python (no training): each stage's progress on the terminal
(stderr, without absl's INFO lines) and appended to workdirs/<stage>.log, stdout's last line stage 2's
JSON, a failing stage stops the script."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("demo_effnet_stage1", "demo_effnet_text_lm_opt", "demo_effnet_stage2_opt")

STUB = r"""#!/usr/bin/env bash
# python -m MODULE ARGS...: blip2_jax.main trains (below), blip2_jax.classify prints its JSON line,
# python -c (the zero-shot summary) prints one line; the rest say nothing.
[ "$2" = blip2_jax.classify ] && { echo '{"metrics": {"top1": 0.5}, "chance_top1": 0.25}'; exit 0; }
[ "$1" = -c ] && { echo '{"zero_shot": "summary"}'; exit 0; }
[ "$2" = blip2_jax.main ] || exit 0
name=${4#--workdir=workdirs/}
echo "I1201 16:08:27.524670 1 checkpoint_manager.py:701] orbax detail ($name)" >&2
echo "step 1/2 | loss=1.0 | 2.0 steps/s | ETA 0:00:01 ($name)" >&2
echo "W1201 16:08:28.000000 1 x.py:1] a warning ($name)" >&2
if [ "${STUB_FAIL:-}" = "$name" ]; then echo "ValueError: boom ($name)" >&2; exit 3; fi
echo "step 2/2 | loss=0.5 | 2.0 steps/s | ETA 0:00:00 ($name)" >&2
echo "{\"stage\": \"$name\"}"
"""


def _repo(tmp_path):
    os.makedirs(tmp_path / "launch")
    os.makedirs(tmp_path / ".venv" / "bin")
    for script in ("demo.sh", "stages.sh"):
        shutil.copy(os.path.join(ROOT, "launch", script), tmp_path / "launch" / script)
    (tmp_path / "launch" / "setup.sh").write_text("exit 0\n")
    (tmp_path / ".venv" / "bin" / "python").write_text(STUB)
    os.chmod(tmp_path / ".venv" / "bin" / "python", 0o755)


def _demo(tmp_path, **env):
    return subprocess.run(["bash", "launch/demo.sh"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_demo_shows_progress_appends_logs_and_ends_with_stage2_json(tmp_path):
    _repo(tmp_path)
    for run in (1, 2):
        out = _demo(tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-3:] == ['{"stage": "demo_effnet_stage1"}', '{"zero_shot": "summary"}',
                                                '{"stage": "demo_effnet_stage2_opt"}']
        err = out.stderr.splitlines()
        for stage in STAGES:
            assert f"step 2/2 | loss=0.5 | 2.0 steps/s | ETA 0:00:00 ({stage})" in err
            assert f"W1201 16:08:28.000000 1 x.py:1] a warning ({stage})" in err
        assert not any("orbax detail" in line for line in err)
    log = (tmp_path / "workdirs" / "demo_effnet_stage1.log").read_text().splitlines()
    assert sum(line.startswith("== ") and "--workdir=workdirs/demo_effnet_stage1" in line for line in log) == 2
    assert log.count("I1201 16:08:27.524670 1 checkpoint_manager.py:701] orbax detail (demo_effnet_stage1)") == 2
    assert log.count("step 2/2 | loss=0.5 | 2.0 steps/s | ETA 0:00:00 (demo_effnet_stage1)") == 2


def test_another_seed_trains_in_its_own_workdirs_and_passes_the_seed(tmp_path):
    _repo(tmp_path)
    out = _demo(tmp_path, DEMO_SEED="2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == '{"stage": "seed2/demo_effnet_stage2_opt"}'
    log = (tmp_path / "workdirs" / "seed2" / "demo_effnet_stage2_opt.log").read_text()
    assert "--config.seed=2" in log and "--config.init.stage1_checkpoint=workdirs/seed2/demo_effnet_stage1" in log


def test_demo_stops_at_a_failing_stage(tmp_path):
    _repo(tmp_path)
    out = _demo(tmp_path, STUB_FAIL="demo_effnet_text_lm_opt")
    assert out.returncode == 1
    assert "ValueError: boom (demo_effnet_text_lm_opt)" in out.stderr.splitlines()
    assert out.stderr.splitlines()[-1] == \
        "demo_effnet_text_lm_opt failed (its log: workdirs/demo_effnet_text_lm_opt.log)"
    assert not (tmp_path / "workdirs" / "demo_effnet_stage2_opt.log").exists()
