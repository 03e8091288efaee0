"""Runs tests/test_cuda.py without pytest, for GPU images that lack it (bench/gpu_check.sh).

Every test function runs once per combination of its parametrize values, in one process, with
stand-ins for the few pytest features the file uses: `pytest.mark` (parametrize, skipif on the
module), `pytest.skip` and the `monkeypatch` fixture (setenv, delenv, setattr). Prints one line
per failure with its traceback, then a count; exits 1 if any test failed.

    python bench/run_cuda_tests.py
    GOFT_CUDA_TESTS_DEVICE=cpu python bench/run_cuda_tests.py   # the tests' own code, on the CPU

tests/test_gpu_scripts.py runs it on the CPU, so that a test using a pytest feature this runner
lacks fails there rather than on the GPU machine.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import sys
import traceback
import types

TESTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "tests"


class Skip(Exception):
    pass


class Marks:
    """pytest.mark: parametrize records its values on the function; other marks are inert."""

    def parametrize(self, names, values, ids=None):
        def deco(fn):
            fn.__dict__.setdefault("params", []).insert(0, ([n.strip() for n in names.split(",")], list(values)))
            return fn

        return deco

    def skipif(self, condition, reason=""):
        return ("skipif", condition, reason)

    def __getattr__(self, name):
        return ("mark", name)


def skip(reason=""):
    raise Skip(reason)


class MonkeyPatch:
    """The parts of pytest's monkeypatch fixture the CUDA tests use; undo() restores everything."""

    _MISSING = object()

    def __init__(self):
        self.saved_env, self.saved_attrs = {}, []

    def setenv(self, name, value):
        self.saved_env.setdefault(name, os.environ.get(name, self._MISSING))
        os.environ[name] = str(value)

    def delenv(self, name, raising=True):
        if name not in os.environ:
            if raising:
                raise KeyError(name)
            return
        self.saved_env.setdefault(name, os.environ[name])
        del os.environ[name]

    def setattr(self, obj, name, value):
        self.saved_attrs.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        for name, value in self.saved_env.items():
            if value is self._MISSING:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for obj, name, value in reversed(self.saved_attrs):
            setattr(obj, name, value)


def main() -> int:
    stand_in = types.ModuleType("pytest")
    stand_in.mark, stand_in.skip = Marks(), skip
    sys.modules["pytest"] = stand_in
    sys.path.insert(0, str(TESTS_DIR))
    import test_cuda as module

    for mark in module.pytestmark:
        if mark[0] == "skipif" and mark[1]:
            print(f"all tests skipped: {mark[2]}")
            return 1  # in a GPU check, a run that tests nothing has failed
    passed = failed = skipped = 0
    for name in [n for n in dir(module) if n.startswith("test_")]:
        fn = getattr(module, name)
        params = fn.__dict__.get("params", [])
        value_sets = [[dict(zip(names, v if len(names) > 1 else (v,))) for v in values] for names, values in params]
        for combo in itertools.product(*value_sets):
            kwargs = {k: v for part in combo for k, v in part.items()}
            patch = MonkeyPatch()
            if "monkeypatch" in fn.__code__.co_varnames[: fn.__code__.co_argcount]:
                kwargs["monkeypatch"] = patch
            try:
                fn(**kwargs)
                passed += 1
            except Skip:
                skipped += 1
            except Exception:  # noqa: BLE001 (a failing test is reported, and the run goes on)
                failed += 1
                shown = {k: v for k, v in kwargs.items() if k != "monkeypatch"}
                print(f"FAILED {name} {shown}")
                traceback.print_exc(limit=3)
            finally:
                patch.undo()
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
