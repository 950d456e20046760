"""The floor plan the README's Layout section draws: the five commands at the top over one package,
imports pointing one way (commands -> package -> its leaves), no circle, short functions, and
every command's --help and flag errors answered before torch is imported."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

COMMANDS = ("train", "infer", "data", "metrics", "serve")
PACKAGE = "captioning"
# The package's leaves: what the commands import before their flags are checked.
LEAVES = ("errors", "cli", "strings", "hub", "workers", "progress", "flags", "presets")
HEAVY = ("torch", "transformers", "datasets", "huggingface_hub", "tokenizers", "PIL", "numpy", "matplotlib")


def project_files():
    """module name -> path, for the commands and every module of the package."""
    files = {name: os.path.join(ROOT, f"{name}.py") for name in COMMANDS}
    for name in sorted(os.listdir(os.path.join(ROOT, PACKAGE))):
        if name.endswith(".py") and name != "__init__.py":
            files[f"{PACKAGE}.{name[:-3]}"] = os.path.join(ROOT, PACKAGE, name)
    return files


def imports(path, known):
    """(project modules, other top-level packages) that a file imports, anywhere in it, as
    (name, line, inside a function?) triples."""
    own, other = [], []
    for node in ast.walk(ast.parse(open(path).read())):
        nested = node.col_offset > 0 if isinstance(node, (ast.Import, ast.ImportFrom)) else None
        if isinstance(node, ast.Import):
            for alias in node.names:
                (own if alias.name in known else other).append((alias.name, node.lineno, nested))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:
                own += [(f"{PACKAGE}.{alias.name}", node.lineno, nested) for alias in node.names]
            elif node.module in known:
                own.append((node.module, node.lineno, nested))
            else:
                other.append((node.module, node.lineno, nested))
    return own, other


@pytest.fixture(scope="module")
def graph():
    files = project_files()
    return {name: imports(path, files) for name, path in files.items()}


def test_the_top_level_holds_the_commands_and_nothing_else():
    top = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))
    assert top == sorted(COMMANDS)


def test_nothing_in_the_package_imports_a_command(graph):
    wrong = [(name, imported, line) for name, (own, _) in graph.items() if name.startswith(PACKAGE)
             for imported, line, _ in own if imported in COMMANDS]
    assert not wrong


def find_circle(edges):
    """One import circle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in edges:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_circle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_no_import_circle(graph):
    edges = {name: sorted({imported for imported, _, _ in own}) for name, (own, _) in graph.items()}
    assert find_circle(edges) is None


def test_package_modules_import_at_the_top(graph):
    """Only the commands delay imports (so that --help answers before torch loads)."""
    nested = [(name, imported, line) for name, (own, other) in graph.items() if name.startswith(PACKAGE)
              for imported, line, inside in own + other if inside]
    assert not nested


def test_the_leaves_need_no_torch_and_no_hugging_face_library(graph):
    for leaf in LEAVES:
        seen, todo = set(), [f"{PACKAGE}.{leaf}"]
        while todo:  # the leaf and everything it imports, transitively
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += [imported for imported, _, _ in graph[name][0]]
        heavy = sorted({(name, other.split(".")[0]) for name in seen for other, _, _ in graph[name][1]
                        if other.split(".")[0] in HEAVY})
        assert not heavy, f"{leaf} needs {heavy}"


def test_no_function_is_over_80_lines():
    long = []
    for name, path in project_files().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long


# A flag error of each command that argparse or its own checks catch before anything loads.
BAD_FLAGS = {"train": ["--epochs", "-1"], "infer": ["x.png", "--num-beams", "0"],
             "data": ["stats", "--dataset", "x", "--test-size", "2"], "metrics": ["--predictions", "p.jsonl"],
             "serve": ["--max-wait-ms", "-1"]}
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flags", ["--help", "bad"])
def test_help_and_flag_errors_answer_without_importing_torch(command, flags):
    args = ["--help"] if flags == "--help" else BAD_FLAGS[command]
    proc = subprocess.run([sys.executable, "-c", PROBE, os.path.join(ROOT, f"{command}.py"), *args],
                          capture_output=True, text=True, timeout=120)
    said = proc.stdout.splitlines()
    assert said[-2:] == ["exit " + ("0" if flags == "--help" else "2"), "torch imported: False"], proc.stdout + proc.stderr
    if flags == "--help":
        assert "usage:" in proc.stdout
    else:
        assert len(proc.stderr.strip().splitlines()) == 1 and "error:" in proc.stderr, proc.stderr
