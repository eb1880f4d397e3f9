import runpy
import sys
from pathlib import Path

import av
import pytest

EXAMPLE = str(Path(__file__).parents[1] / "examples" / "wan_moc_inference.py")


def test_wan_moc_inference_example_runs_tiny(tmp_path, monkeypatch):
    out = tmp_path / "wan_moc.mp4"
    monkeypatch.setattr(sys, "argv", [EXAMPLE, "--tiny", "--top-k", "1", "--shots", "2", "1", "--output", str(out)])
    runpy.run_path(EXAMPLE, run_name="__main__")
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9


def test_wan_moc_inference_example_rejects_wrong_shots(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [EXAMPLE, "--tiny", "--shots", "2", "2", "--output", str(tmp_path / "x.mp4")])
    with pytest.raises(ValueError, match="transformer input has 3 latent frames"):
        runpy.run_path(EXAMPLE, run_name="__main__")
    assert not (tmp_path / "x.mp4").exists()
