"""Generate the Python stubs under serving/wire from proto/ (run: `python proto/generate.py`).

protoc writes absolute imports (`from inference import model_config_pb2`); they are rewritten to the
package path so that the stubs live inside `serving` and need nothing on sys.path.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "serving" / "wire"
PACKAGE = "serving.wire"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
               f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *files]
        subprocess.run(cmd, check=True)
        top_packages = sorted({f.split("/")[0] for f in files})
        pattern = re.compile(rf"^(from|import) ({'|'.join(map(re.escape, top_packages))})(\.|\s)", re.M)
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            text = pattern.sub(lambda m: f"{m.group(1)} {PACKAGE}.{m.group(2)}{m.group(3)}", src.read_text())
            # A private descriptor pool: Triton's client registers its own `inference.*` messages in the
            # default pool, and both must live in one process (tests, mixed clients).
            text = text.replace("_descriptor_pool.Default()", "_private_pool.POOL")
            text = text.replace("from google.protobuf import descriptor_pool as _descriptor_pool",
                                f"from {PACKAGE} import _pool as _private_pool")
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            written.append(dest)
        for d in {p.parent for p in written} | {out_dir}:
            (d / "__init__.py").touch()
        pool = out_dir / "_pool.py"
        pool.write_text('"""The descriptor pool of the generated stubs (kept apart from the default pool)."""\n\n'
                        "from google.protobuf import descriptor_pool\n\nPOOL = descriptor_pool.DescriptorPool()\n")
        written.append(pool)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(path)
