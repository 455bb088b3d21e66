"""The README's Python examples run as written and do what the README says they do."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_and_train():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    losses = namespace["losses"]
    # The README states "loss 1.154 -> 0.00xx": the adaptive mode fits 256 points in 20 steps.
    assert 1.1 < losses[0] < 1.2, losses[0]
    assert losses[-1] < 0.01, losses[-1]
    assert all(b < a for a, b in zip(losses[:5], losses[1:6], strict=True)), losses[:6]
    nnx_losses = namespace["nnx_losses"]
    assert nnx_losses[-1] < 0.7 * nnx_losses[0], nnx_losses
