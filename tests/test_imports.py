"""The package imports without circles: every module can be imported first, on its own."""

import importlib
import pkgutil
import subprocess
import sys

import ciscr

MODULES = ["ciscr.cli", "ciscr.commands", "ciscr.predict", "ciscr.report", "ciscr.timing.bench",
           "ciscr.visualize", "ciscr.export", "ciscr.demo", "ciscr.runner", "ciscr.methods",
           "ciscr.pipeline", "ciscr.online", "ciscr.engine.online", "ciscr.run_services",
           "ciscr.run_setup", "ciscr.stage_plans", "ciscr.loading", "ciscr.predict_io",
           "ciscr.run_facts", "ciscr.engine.streams"]


# One interpreter loads the heavy third-party libraries (not ciscr), then forks a child per
# module: each child imports its module first, as a fresh interpreter would, without paying
# for torch's import again (20 fresh interpreters took a large part of the suite's time).
_FORKED_IMPORTS = """
import importlib, os, sys, traceback
import numpy, torch, yaml, pydantic  # third-party only: ciscr stays unimported here
assert not any(m == "ciscr" or m.startswith("ciscr.") for m in sys.modules)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    # A circle (a imports b imports a) shows up as an ImportError / AttributeError when one of
    # its modules is the FIRST to be imported; so each module gets its own process.
    known = {m.name for m in pkgutil.walk_packages(ciscr.__path__, "ciscr.")}
    assert set(MODULES) <= known
    proc = subprocess.run([sys.executable, "-c", _FORKED_IMPORTS, *MODULES],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.strip().splitlines()[-1] == "FAILED:", proc.stderr[-3000:]


def test_the_forked_import_check_sees_a_failing_import():
    proc = subprocess.run([sys.executable, "-c", _FORKED_IMPORTS, "ciscr.cli", "ciscr.no_such"],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "FAILED:ciscr.no_such"
    assert "ModuleNotFoundError" in proc.stderr


def test_command_modules_do_not_import_the_cli():
    # The sub-commands register in ciscr.commands; only the CLI imports them (no circle).
    for mod in ("predict", "report", "timing.bench", "timing.profiling", "visualize", "export",
                "demo", "runner"):
        source = importlib.util.find_spec(f"ciscr.{mod}").origin
        text = open(source).read()
        assert "from ciscr.cli import" not in text and "import ciscr.cli" not in text, mod
