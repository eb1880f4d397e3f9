"""`diffusers_moc` imports and runs without Triton; asking for the Triton backend then names the problem."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # as if triton were not installed: `import triton` raises ImportError
    import torch
    from diffusers_moc import ChunkLayout, MoCConfig, available_backends, moc_attention

    layout = ChunkLayout.for_video(3, 4)
    q = torch.randn(1, 12, 2, 8)
    assert moc_attention(q, q, q, layout, MoCConfig(backend="auto")).shape == q.shape
    assert "triton" not in available_backends("cpu")
    try:
        moc_attention(q, q, q, layout, MoCConfig(backend="triton"))
    except RuntimeError as e:
        assert "backend='triton' is not available" in str(e), e
        print("ok")
    """
)


def test_package_works_without_triton():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
