"""The package's import graph, read from the source with `ast`: no cycles, and layers that point one way.

Every `import` counts, also those inside functions: a lazy import hides a cycle from the interpreter, not
from a reader. A module's own ancestor packages are left out (a package's `__init__` may import its
children, as a registry does; a child always runs after its package).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lowbit

SRC = Path(lowbit.__file__).resolve().parent.parent

# Lower number = lower layer; a module may import its own layer or lower ones only.
LAYERS = {"formats": 0, "kernels": 1, "nn": 2, "methods": 3, "pipeline": 4, "inference": 4, "jobs": 5, "api": 6, "cli": 7}


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in (SRC / "lowbit").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if pkg else parts)] = (p, pkg)
    return mods


def _targets(mod: str, pkg: bool, node: ast.AST, mods: dict) -> set[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            q = ".".join(parts[:i])
            if q in mods and not (mod + ".").startswith(q + "."):
                out.add(q)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for mod, (path, pkg) in mods.items():
        graph[mod] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[mod] |= _targets(mod, pkg, node, mods)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_lowbit():
    graph = import_graph()
    assert len(graph) > 50 and "lowbit.methods.gptq" in graph["lowbit.methods"]
    assert cycles(graph) == []


def test_layers_point_one_way():
    def layer(m: str):
        parts = m.split(".")
        return LAYERS.get(parts[1]) if len(parts) > 1 else None

    wrong = [f"{a} -> {b}" for a, bs in import_graph().items() for b in sorted(bs)
             if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert wrong == []


# ---- one registry


def test_docs_methods_is_generated_from_the_registries():
    from lowbit import catalog

    doc = (SRC.parent / "docs" / "methods.md")
    if not doc.is_file():  # an installed package without the repository's docs/
        return
    assert doc.read_text() == catalog.markdown(), "regenerate: lowbit methods --markdown > docs/methods.md"


def test_every_registered_method_is_reachable_by_name_everywhere():
    from typer.testing import CliRunner

    from lowbit import catalog
    from lowbit.cli import app
    from lowbit.methods import METHODS, method_names, parse_method_config
    from lowbit.qat.config import METHODS as QAT_METHODS, parse_qat_config

    names = method_names()
    assert names == [m.name for m in METHODS] and len(set(names)) == len(names)
    for name in names:
        assert parse_method_config({"method": name}).method == name
    mapping = catalog.recipe_schema()["properties"]["quant"]["discriminator"]["mapping"]
    assert sorted(mapping) == sorted(names)
    for name in QAT_METHODS:
        assert parse_qat_config({"method": name}).method == name
    listed = {(r["command"], r["method"]) for r in catalog.rows()}
    assert listed == {("quantize", n) for n in names} | {("finetune", n) for n in QAT_METHODS}
    res = CliRunner().invoke(app, ["quantize", "model", "-o", "out", "--method", "nosuch"])
    assert res.exit_code == 2 and all(n in res.output for n in names), res.output
    for command, registered in (("quantize", names), ("finetune", QAT_METHODS)):  # --help from the registries
        res = CliRunner().invoke(app, [command, "--help"])
        flat = re.sub(r"[│\s]+", " ", res.output)  # the help box wraps the line
        assert res.exit_code == 0 and " | ".join(registered) in flat, res.output


def test_the_layout_in_docs_matches_the_tree():
    doc = SRC.parent / "docs" / "architecture.md"
    if not doc.is_file():
        return
    text = doc.read_text()
    pkg = SRC / "lowbit"
    named = set(re.findall(r"`([A-Za-z_][\w/]*(?:\.py|\.c|/))`", text))
    files = {p.name for p in pkg.rglob("*") if p.suffix in (".py", ".c")}
    named = {n for n in named if not n.startswith(("bench/", "tests/"))}
    assert all((SRC.parent / n).is_file() for n in ("bench/suite.py", "tests/test_architecture.py"))
    dirs = {p.name + "/" for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert not {n for n in named if n.endswith("/") and n not in dirs | {"corpora/"}}, "named dirs that do not exist"
    assert not {n for n in named if not n.endswith("/") and n.rsplit("/", 1)[-1] not in files}, "named files missing"
    top = {p.name for p in pkg.glob("*.py") if p.name != "__init__.py"}
    assert dirs <= named and not (top - named), f"not in docs/architecture.md: {sorted((dirs - named) | (top - named))}"


def test_every_setting_is_reachable_from_the_command_line(tiny_model_dir, tmp_path):
    """`--set` reaches any field of any registered config through its dotted recipe path, validated."""
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.errors import LowbitError
    from lowbit.recipe import Recipe, apply_settings

    r = apply_settings(Recipe(), ["quant.damp_percent=0.05", "quant.method=claq", "quant.kmeans.max_iter=7",
                                  "calibration.n_samples=16", "quant.lqer.rank=4"])
    assert (r.quant.method, r.quant.group_size, r.quant.damp_percent) == ("claq", -1, 0.05)
    assert (r.quant.kmeans.max_iter, r.calibration.n_samples, r.quant.lqer.rank) == (7, 16, 4)
    for bad, why in (("quant.nosuch=1", "nosuch"), ("quant.bits=99", "unsupported bit width"),
                     ("bits", "KEY=VALUE"), ("quant.bits=[1", "not valid YAML"), ("quant.bits.x=1", "not a group")):
        try:
            apply_settings(Recipe(), [bad])
            raise AssertionError(bad)
        except LowbitError as e:
            assert why in str(e)
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(out), "--method", "rtn", "--quiet",
                                   "--set", "quant.group_size=16", "--set", "quant.symmetric=true"])
    assert res.exit_code == 0, res.output
    import json

    q = json.loads((out / "lowbit.json").read_text())["recipe"]["quant"]
    assert (q["group_size"], q["symmetric"]) == (16, True)
