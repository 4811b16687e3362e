"""Download, as wheels, what an offline GPU machine lacks of this project's dependencies (into an ignored folder).

    python benchmarks/device_wheels.py --out .whl [--python 3.12] [--have device_packages.txt]

The GPU machines this project is checked on have no network and an image with torch, pytorch-lightning,
transformers, sentence-transformers, torchmetrics, safetensors, scipy, accelerate and pytest, but not jsonargparse,
wandb, datasets, mteb or sacremoses. This walks the requirements of those (``Requires-Dist`` of each wheel, markers
evaluated for the target Python on Linux x86-64), skips every distribution the machine already has (``--have``:
one name per line or comma-separated; the default list is the image's as last read), and ``pip download``s one
wheel of each of the rest. pip's resolver cannot do this by itself: it would resolve torch and its CUDA wheels
again rather than take the machine's. Versions already on the machine are assumed to satisfy the bounds (their
versions are recent); a run on the machine that fails to import names the one that does not.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

WANTED = ["jsonargparse[signatures]>=4.27", "wandb>=0.16", "datasets>=2.18", "sacremoses>=0.1"]
# mteb pulls polars' 54 MiB runtime, too much for the 64 MiB a call carries, and nothing on the GPU check needs it
# (callbacks/mteb.py imports it when used): --with_mteb adds it for a machine that receives more.
# The GPU image's distributions (its package list as read in 2026-11); --have replaces it.
IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-
pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-
cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-
operator lineax llvmlite lxml markdown markdown- it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-
cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-
nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-
headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest- mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-
core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(req: str, out: Path, python: str) -> Path:
    """One wheel of ``req`` for the target interpreter, into ``out``; returns its path."""
    before = set(out.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(out), req]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True)
    new = set(out.glob("*.whl")) - before
    name = canonical(Requirement(req).name)
    found = new or {w for w in out.glob("*.whl") if canonical(w.name.split("-")[0]) == name}
    return sorted(found)[0]


def requirements(wheel: Path, extras: set[str], python: str) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".whl")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    ap.add_argument("--have", default=None, help="file listing the machine's distributions")
    ap.add_argument("--with_mteb", action="store_true", help="also mteb and its needs (about 62 MiB more)")
    args = ap.parse_args(argv)
    have = IMAGE if args.have is None else re.split(r"[\s,]+", Path(args.have).read_text())
    have = {canonical(n) for n in have if n}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo, done = [Requirement(r) for r in WANTED + ["mteb>=1.12"] * args.with_mteb], set()
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in have or name in done:
            continue
        done.add(name)
        wheel = download(str(req).split(";")[0], out, args.python)
        print(f"{wheel.name}  ({wheel.stat().st_size / 2**20:.1f} MiB)")
        todo += requirements(wheel, set(req.extras), args.python)
    total = sum(w.stat().st_size for w in out.glob("*.whl"))
    print(f"{len(done)} wheels, {total / 2**20:.1f} MiB in {out} (the device tool carries at most 64 MiB in all)")


if __name__ == "__main__":
    main()
