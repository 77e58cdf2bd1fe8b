"""pyproject's dependency lower bounds (for `pip install git+<repo>`) follow requirements.txt's pins."""
import os
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(REPO, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.lower()] = version
    return pins


def test_pyproject_lower_bounds_are_the_tested_pins():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    bounds = dict(d.lower().split(">=") for d in deps)
    pins = _pins()
    pins.pop("jaxlib")  # comes with jax
    assert bounds == pins
    assert "torch" not in bounds
