"""`train.metrics.write_parameter_overview`: the run's parameter table (clu) and its totals."""
import numpy as np

from blip2_jax.train import metrics


def test_parameter_overview_counts_and_names_every_tree(tmp_path):
    trainable = {"qformer": {"kernel": np.zeros((3, 4), np.float32)}, "temp": np.float32(0.07)}
    frozen = {"vision": {"embed": np.zeros((5, 2), np.float32)}}
    line = metrics.write_parameter_overview(str(tmp_path), trainable, frozen)
    assert line == "parameters: 13 trainable, 10 frozen"
    text = (tmp_path / metrics.PARAMETER_OVERVIEW).read_text()
    assert text.startswith(line)
    for name in ("qformer/kernel", "temp", "vision/embed", "# frozen", "(3, 4)", "(5, 2)"):
        assert name in text
    assert "# frozen" not in metrics.write_parameter_overview(str(tmp_path / "b"), trainable, {}) and \
        "# frozen" not in (tmp_path / "b" / metrics.PARAMETER_OVERVIEW).read_text()
