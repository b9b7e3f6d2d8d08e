"""The shape the code keeps so that a reader can take in each file in one sitting (issue 22's
targets): short functions with few positional parameters, a loop without engine branches, a short
train.py and README."""
import ast
import glob
import os

from conftest import ROOT

MODULES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "kernels", "*.py")))


def functions():
    for path in MODULES:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield os.path.relpath(path, ROOT), node


def test_no_function_is_longer_than_60_lines():
    long = [f"{path}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)" for path, f in functions()
            if f.end_lineno - f.lineno + 1 > 60]
    assert not long, long


def test_no_function_outside_the_kernels_takes_more_than_6_positional_parameters():
    def positional(f):
        names = [a.arg for a in f.args.posonlyargs + f.args.args]
        return len(names) - (names[:1] in (["self"], ["cls"]))
    many = [f"{path}:{f.lineno} {f.name}" for path, f in functions() if not path.startswith("kernels") and positional(f) > 6]
    assert not many, many


def test_the_loop_and_evaluation_do_not_branch_on_the_engine():
    for name in ("train.py", "dpo.py", "evaluate.py"):
        assert "cfg.fsdp" not in open(os.path.join(ROOT, name)).read(), name


def test_train_py_and_readme_stay_short():
    assert len(open(os.path.join(ROOT, "train.py")).readlines()) <= 350
    assert len(open(os.path.join(ROOT, "README.md")).readlines()) <= 250
