"""The committed stubs under serving/wire are exactly what proto/generate.py makes from proto/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in generate.generate(tmp_path)}
    committed_dir = ROOT / "serving" / "wire"
    committed = {p.relative_to(committed_dir): p.read_text() for p in committed_dir.rglob("*.py*")
                 if p.name != "__init__.py" and "__pycache__" not in p.parts}
    assert fresh.keys() == committed.keys(), "stubs added or removed: run `python proto/generate.py`"
    stale = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert not stale, f"stale stubs {stale}: run `python proto/generate.py`"
