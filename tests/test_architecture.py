"""The package's shape: its folders are the stages of the data path, lower stages never import higher ones
(the import-linter contracts in pyproject.toml), and no module takes part in an import cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root), "PATH": ""},
                          capture_output=True, text=True)


def test_the_layers_contract_holds():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_lower_stage_importing_a_higher_one_breaks_the_contract_and_is_named(tmp_path):
    shutil.copytree(REPO / "rlcd_data", tmp_path / "rlcd_data")
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    chat = tmp_path / "rlcd_data" / "tasks" / "chat.py"
    chat.write_text(chat.read_text() + "\nfrom ..pipeline.config import BuildConfig  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    assert "Stages import only the stages below them BROKEN" in result.stdout
    assert "rlcd_data.tasks is not allowed to import rlcd_data.pipeline" in result.stdout
    assert "rlcd_data.tasks.chat -> rlcd_data.pipeline.config" in result.stdout


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's strongly connected components of the module import graph (iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_no_module_takes_part_in_an_import_cycle():
    graph = grimp.build_graph("rlcd_data", cache_dir=None)
    cycles = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    assert cycles == []
    # The check finds a cycle where there is one.
    graph.add_import(importer="rlcd_data.tasks.conversation", imported="rlcd_data.tasks.chat")
    assert ["rlcd_data.tasks.chat", "rlcd_data.tasks.conversation"] in [
        sorted(c) for c in strongly_connected(graph) if len(c) > 1
    ]


def test_the_public_api_is_where_it_was():
    import rlcd_data
    from rlcd_data import BuildConfig, RlcdError, RunOptions, build, load_task  # noqa: F401

    assert set(rlcd_data.__all__) >= {"BuildConfig", "RlcdError", "RunOptions", "build", "load_task"}
    assert load_task("harmless").name == "harmless"
    assert callable(rlcd_data.build)  # not shadowed by a subpackage of that name (the build lives in pipeline/)
