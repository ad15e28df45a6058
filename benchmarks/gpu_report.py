"""Everything the project owes on a GPU, in one call of under 10 minutes, written to one JSON report.

Here (a machine with the registries): `python benchmarks/gpu_report.py --wheels` puts into `.whl/` (git-ignored) the
wheels the GPU machine's image lacks, for its Python 3.12, at the versions this project's environment holds (its image
has torch, transformers, peft, accelerate and triton; about 46 MB, under the 64 MiB a call carries). There, with
`.whl` carried: `python3 benchmarks/gpu_report.py --out $OUT` installs them into /tmp/site, builds random Llama models
of TinyLlama's shapes, and runs each item below in its own process under its own time limit, rewriting
`$OUT/gpu_report.json` after each, so that whatever finished comes back even if a later item runs out of time:
- the GPU-marked tests;
- the mixed-batch grid on a random model (`mixed_batch.py`, which also times the Triton kernels against the loop);
- QLoRA training against plain peft, with and without liger (`training.py`) on the 1.1B shape;
- export fidelity (`export.py`) on the 0.4B shape;
- the scale benchmark (`scale.py`: export, its fidelity, runtime) on the 1.1B and 3B shapes (CPU memory, 16 threads).
The limits add up to 560 s: run it with timeout_s 600.

    python benchmarks/gpu_report.py --wheels            # here
    python3 benchmarks/gpu_report.py --out $OUT         # there (device run, carry .whl)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/site")
WORK = Path("/tmp/gpu_report")
# what the GPU machine's image lacks (its KINDS.md lists what it has)
MISSING = ["bitsandbytes", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "datasets", "dill",
           "multiprocess", "fastapi", "starlette", "gguf", "liger-kernel"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]


def download_wheels() -> None:
    from importlib.metadata import PackageNotFoundError, version

    specs = []
    for name in MISSING:
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            specs.append(name)  # not in this environment (liger: CUDA only): the newest
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "-d", str(WHEELS), *[a for p in PLATFORMS for a in ("--platform", p)], *specs]
    subprocess.run(command, check=True)
    size = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    print(f"{len(list(WHEELS.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {WHEELS}")


def items(python: str) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed), in the order they run."""
    bench = ROOT / "benchmarks"
    return [
        ("gpu_tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                       "tests/test_integration.py", "tests/test_lora_kernels.py"], 60),
        ("mixed_batch", [python, str(bench / "mixed_batch.py"), "--models", "random", "--random-hidden", "2048",
                         "--random-layers", "22", "--ks", "1,4,16,64"], 100),
        ("training", [python, str(bench / "training.py"), "--model", str(WORK / "1.1b"), "--steps", "20",
                      "--repeats", "2", "--batch-size", "8", "--max-length", "256"], 140),
        ("export_fidelity", [python, str(bench / "export.py"), "--model", str(WORK / "0.4b"), "--steps", "25"], 50),
        ("scale", [python, str(bench / "scale.py"), "--sizes", "1.1b,3b", "--threads", "16", "--work",
                   str(WORK / "scale"), "--ops", "export,export_fidelity,runtime"], 150),
    ]


def run_all(out: Path, only: set[str] | None = None, install: bool = True) -> None:
    env = dict(os.environ)
    if install and WHEELS.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, WHEELS.glob("*.whl"))],
                       check=True)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "items": {}}
    path = out / "gpu_report.json"
    setup = [sys.executable, "-c", "from peft_adapt.testing.tiny_models import build_random_llama as b; "
             f"[b('{WORK}/' + s, s) for s in ('0.4b', '1.1b')]"]
    for name, command, seconds in [("build_models", setup, 60), *items(sys.executable)]:
        if only is not None and name not in only:
            continue
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds)
            rc, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = "timeout", _text(e.stdout), _text(e.stderr)
        lines = []
        for line in stdout.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        report["items"][name] = {"rc": rc, "seconds": round(time.perf_counter() - started, 1), "results": lines,
                                 "stdout_tail": stdout[-3000:], "stderr_tail": stderr[-3000:]}
        path.write_text(json.dumps(report, indent=1))
        print(f"{name}: rc {rc}, {report['items'][name]['seconds']} s, {len(lines)} results", flush=True)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", action="store_true", help="download the wheels the GPU machine lacks, here")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where the report goes")
    parser.add_argument("--items", help="only these, comma-separated (a dry run of the plumbing)")
    parser.add_argument("--no-install", action="store_true", help="use this environment's packages as they are")
    args = parser.parse_args()
    if args.wheels:
        download_wheels()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run_all(args.out, set(args.items.split(",")) if args.items else None, install=not args.no_install)


if __name__ == "__main__":
    main()
