"""Which of the project's modules one warm call runs through: a Classify and a ModelInfer of one 28x28 picture
against a server started in this process, traced with sys.setprofile on the server's event loop thread (a lone
caller's small batch runs there). Prints one line per call: the module count and the modules, in call order.

    python scripts/call_path.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.client import ClassifierClient  # noqa: E402
from tests.conftest import export_small, running_server  # noqa: E402


def traced(server, call) -> list[str]:
    seen: list[str] = []
    done = threading.Event()

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(str(ROOT / "serving")):
            module = str(Path(path).relative_to(ROOT))
            if module not in seen:
                seen.append(module)

    server.loop.call_soon_threadsafe(lambda: (sys.setprofile(profile), done.set()))
    done.wait()
    call()
    done.clear()
    server.loop.call_soon_threadsafe(lambda: (sys.setprofile(None), done.set()))
    done.wait()
    return [m for m in seen if "/wire/" not in m]


def main() -> None:
    import tritonclient.grpc as triton
    picture = np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)
    with tempfile.TemporaryDirectory() as repo:
        export_small(Path(repo))
        with running_server(Path(repo)) as server, ClassifierClient(server.address) as client:
            triton_client = triton.InferenceServerClient(server.address)
            tensor = triton.InferInput("input", [1, 1, 28, 28], "UINT8")
            tensor.set_data_from_numpy(picture[None, None])
            calls = {"Classify": lambda: client.classify([picture]),
                     "ModelInfer": lambda: triton_client.infer("fmnist", [tensor])}
            for name, call in calls.items():
                call()  # warm
                modules = traced(server, call)
                print(f"{name}: {len(modules)} modules: {', '.join(modules)}")


if __name__ == "__main__":
    main()
