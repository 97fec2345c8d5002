"""The student job's entry point, run by the integration tests in place of ``student_train/main.py``.

It runs ``student_train.main.main()`` unchanged and then, on rank 0, writes the evidence of the design's
promise to ``<output.dir>/probe.json``: no Ray and no teacher loader were imported, and no model other than
the student is alive in the process. The evidence is gathered here, by the test, not by the entry point.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student_train.main import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    out = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("output.dir=")), None)
    if out and os.environ.get("RANK", "0") == "0":
        from transformers import PreTrainedModel

        alive = {type(o).__name__ for o in gc.get_objects() if isinstance(o, PreTrainedModel)}
        evidence = {
            "ray_imported": "ray" in sys.modules,
            "teacher_loader_imported": "teacher_cache.teacher" in sys.modules,
            "models_alive": sorted(alive),
        }
        (Path(out) / "probe.json").write_text(json.dumps(evidence, indent=2))
    sys.exit(code)
