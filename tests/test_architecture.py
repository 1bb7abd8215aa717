"""ARCHITECTURE.md is true of the code: every module is in its layer list, imports point down the layers
(function-level imports included), no module and no package is in an import cycle, only the Ray layer
imports Ray, no function of the library is longer than 60 lines and no class longer than 250, and its
certifier table names the registry's certifiers with the kinds and norms their classes declare."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONGEST_FUNCTION = 60
LONGEST_CLASS = 250


def layers() -> dict[str, int]:
    """Module path or package directory -> layer, from the layer block of ARCHITECTURE.md."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = text.split("## Layers, from the bottom up", 1)[1].split("```")[1]
    found, layer = {}, 0
    for line in block.splitlines():
        match = re.match(r"(?:layer (\d+))?\s+(pipeline/[\w/]*?(?:\.py|/))\s", line + " ")
        if match:
            layer = int(match.group(1) or layer)
            found[match.group(2)] = layer
    return found


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the library."""
    found = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(path: Path, table: dict[str, int]) -> int | None:
    relative = path.relative_to(ROOT).as_posix()
    if relative in table:
        return table[relative]
    owners = [key for key in table if key.endswith("/") and relative.startswith(key)]
    return table[max(owners, key=len)] if owners else None


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def test_every_module_is_in_a_layer_and_imports_point_down():
    table, known = layers(), modules()
    unlisted = [name for name, path in known.items() if layer_of(path, table) is None]
    assert not unlisted, f"modules missing from ARCHITECTURE.md's layers: {unlisted}"
    listed = [key for key in table if not (ROOT / key).exists()]
    assert not listed, f"ARCHITECTURE.md lists what does not exist: {listed}"
    upward = [f"{name} (layer {layer_of(path, table)}) imports {other} (layer {layer_of(known[other], table)})"
              for name, path in known.items() for other in imports(path, known)
              if layer_of(known[other], table) > layer_of(path, table)]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> None:
    """Raises AssertionError naming the first import cycle of `graph` (name -> names it imports)."""
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(name):], name]))
        if name in done:
            return
        stack.append(name)
        for other in sorted(graph[name]):
            visit(other)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    # a package's __init__ importing its own submodules is how packages work; the cycle check is between modules
    for name in graph:
        graph[name] = {other for other in graph[name] if not (known[name].name == "__init__.py"
                                                              and other.startswith(name + "."))}
    find_cycle(graph)


def package(name: str) -> str:
    """The unit a module belongs to at the package level: its subpackage of `pipeline`, or itself."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / Path(*parts)).is_dir() else name


def test_no_import_cycle_between_packages():
    """Modules folded into their packages (certifiers, models, data, denoise, nightly, distributed): no loop,
    such as a config module importing a package one of whose modules imports that config module."""
    known, graph = modules(), {}
    for name, path in known.items():
        graph.setdefault(package(name), set()).update(package(other) for other in imports(path, known))
    find_cycle({unit: targets - {unit} for unit, targets in graph.items()})


def test_only_the_ray_layer_imports_ray():
    offenders = []
    for name, path in modules().items():
        if name.startswith("pipeline.distributed"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "ray" for alias in node.names):
                offenders.append(name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
                offenders.append(name)
    assert not offenders, f"Ray imported outside pipeline/distributed/: {sorted(set(offenders))}"


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert not long, "functions longer than 60 lines:\n" + "\n".join(long)


def test_no_class_is_longer_than_250_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > LONGEST_CLASS]
    assert not long, "classes longer than 250 lines:\n" + "\n".join(long)


def certifier_table() -> dict[str, tuple[str, str]]:
    """Certifier name -> (kind column, norm column), from the first table of ARCHITECTURE.md."""
    rows = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().split("## Layers", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_the_certifier_table_names_what_the_classes_declare():
    """Every registered certifier has a row, and every certifier of the demo config (one of each, and the
    sequential mode) has a kind its row names and the norm its row gives."""
    from pipeline.certifiers import REGISTRY
    from pipeline.config import load_config

    table = certifier_table()
    assert sorted(table) == sorted(REGISTRY)
    for certifier in load_config(ROOT / "jobs" / "configs" / "demo.yaml").certifiers:
        kinds, norm = table[certifier.name]
        assert certifier.kind in re.findall(r"\w+", kinds), (certifier.name, certifier.kind, kinds)
        assert certifier.norm == norm, (certifier.name, certifier.norm, norm)
