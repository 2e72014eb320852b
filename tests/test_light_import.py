"""`import deita_ray` and the CLI's --help must not load torch, vLLM or DeepSpeed."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "vllm", "deepspeed", "transformers")

PROBE = """
import sys
{body}
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""

IMPORT_EVERY_MODULE = (
    "import importlib, pkgutil, deita_ray\n"
    "for m in pkgutil.walk_packages(deita_ray.__path__, 'deita_ray.'):\n"
    "    importlib.import_module(m.name)\n"
)


def _loaded_heavy(body: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(body=body, heavy=heavy)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    line = [x for x in out.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY=") :].split(",") if m]


def test_import_package_is_light():
    assert _loaded_heavy("import deita_ray; import deita_ray.config") == []


def test_every_library_module_imports_light():
    assert _loaded_heavy(IMPORT_EVERY_MODULE) == []


def test_library_does_not_import_the_test_fixtures():
    """``testing/`` (tiny models, synthetic pools) is not installed with the package."""
    assert _loaded_heavy(IMPORT_EVERY_MODULE, heavy=("testing",)) == []


def test_pipeline_help_is_light():
    body = (
        "import contextlib, io\n"
        "from deita_ray import pipeline\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    pipeline.main(['--help'])\n"
    )
    assert _loaded_heavy(body) == []


def test_pipeline_help_runs_as_module():
    out = subprocess.run(
        [sys.executable, "-m", "deita_ray.pipeline", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--config" in out.stdout and "--set" in out.stdout
