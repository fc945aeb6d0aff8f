"""The custom-processor example in README.md (and services/PROCESSORS.md) runs as documented."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from processor_support import paced, sine, to_chunks

from audiosockets.processor import Processor

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DOC = ROOT / "services" / "PROCESSORS.md"


def example(path: Path) -> str:
    code = re.search(r"```python\n(# loudness\.py.*?)```", path.read_text(), re.S)
    assert code is not None, f"no loudness.py example in {path.name}"
    return code.group(1)


def test_readme_and_guide_show_the_same_example() -> None:
    assert example(README) == example(DOC)


async def test_the_ten_line_example_handler(tmp_path: Path) -> None:
    source = example(README)
    assert len(source.strip().splitlines()) <= 10
    handler = tmp_path / "loudness.py"
    handler.write_text(source)
    quiet, loud = sine(300, 0.1, 16000, 0.01), sine(300, 0.1, 16000, 0.5)
    out = io.StringIO()
    await Processor(f"{handler}:handle", events=out).run(
        paced(to_chunks(np.concatenate([quiet, loud]), 16000, 1600))
    )
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert event["event"] == "loud"
    assert event["seq"] == 1
    assert event["handler"] == "loudness.py:handle"
