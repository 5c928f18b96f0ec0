"""The programs the tree runs, checked against scripts/programs.txt, the one list of them.

- `read_list` parses the list: program -> Debian package.
- `scan` reads every Python file of a tree (not its .venv) and finds each place that starts a
  program: the `subprocess` functions, `asyncio.create_subprocess_exec`, `os.exec*`,
  `os.spawn*`, `os.posix_spawn*`, `os.system`, `os.popen`, and the tree's own helpers around
  them, found on the way (a function whose program comes from its parameter is a launcher
  itself, and its callers are sites). A site names its program when the code does: a literal,
  a constant, a local assignment, `shutil.which("x")`, `sys.executable`, a function of the
  module that returns an argv. Cluster files' pod commands (YAML, and "command" lists in
  Python dicts) are sites too: localcluster runs them.
- `ProgramGuard` is an audit hook that records every program a test process starts that is
  not on the list (tests/conftest.py installs it).

The scan is deliberately small: what it cannot name it reports as unresolved, with the reason,
and the test decides which of those are allowed (a user's own command, say).
"""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LIST_PATH = ROOT / "scripts" / "programs.txt"

# Directories never scanned: the venv, caches, build output and benchmark results.
SKIP_DIRS = frozenset({".venv", "venv", "build", "dist", "__pycache__", "node_modules", "results"})

INTERPRETER = "<python>"  # sys.executable, or a cluster file's "{python}"
VENV_BIN = "<venv>/"  # Path(sys.executable).parent / "name": a console script of the venv
_PYTHON_NAME = re.compile(r"python3?(\.\d+)?")


def is_own(program: str) -> bool:
    """The interpreter (`sys.executable`, a bare python3.x name) or a program of the venv's
    (a console script next to `sys.executable`): setup's Python part brings these."""
    if program == INTERPRETER or _PYTHON_NAME.fullmatch(os.path.basename(program)):
        return True
    if program.startswith(VENV_BIN):
        return True
    venv_bin = os.path.dirname(sys.executable)
    return os.path.dirname(program) == venv_bin or (
        os.path.realpath(program) == os.path.realpath(sys.executable)
    )


def read_list(path: Path = LIST_PATH) -> dict[str, str]:
    """program -> package; "-" lines (a package with nothing to run) are left out."""
    listed: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) < 3:
            raise ValueError(f"{path}:{n}: want 'program package why', got {raw!r}")
        program, package = words[0], words[1]
        if program == "-":
            continue
        if "/" in program or program in listed:
            raise ValueError(f"{path}:{n}: {program!r} is a path or listed twice")
        listed[program] = package
    return listed


def read_packages(path: Path = LIST_PATH) -> set[str]:
    """Every package the list names, with or without a program."""
    out = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].split()
        if len(line) >= 2:
            out.add(line[1])
    return out


# --- resolving what a site runs ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Param:
    """The program comes from a parameter of the enclosing function."""

    name: str
    kind: str  # "argv": a sequence whose first item is the program; "program": the program


@dataclass(frozen=True, slots=True)
class Unresolved:
    why: str


# A site's possible programs: names, INTERPRETER, parameters, or reasons it cannot tell.
Outcome = str | Param | Unresolved
EMPTY = Unresolved("an empty argv")


@dataclass(frozen=True, slots=True)
class Site:
    path: str  # relative to the scanned root
    line: int
    function: str  # enclosing function, "<module>", or "<yaml>"
    outcomes: frozenset[Outcome]

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line} ({self.function})"

    def programs(self) -> set[str]:
        return {o for o in self.outcomes if isinstance(o, str) and o != INTERPRETER}

    def unresolved(self) -> list[str]:
        return sorted(o.why for o in self.outcomes if isinstance(o, Unresolved))


@dataclass(frozen=True, slots=True)
class Launcher:
    """A callable that starts a program; `index` is where its program or argv is passed."""

    index: int
    keyword: str | None
    kind: str  # "argv" | "program" | "shell" | "varargs"


_STDLIB_LAUNCHERS: dict[str, Launcher] = {
    **{
        f"subprocess.{f}": Launcher(0, "args", "argv")
        for f in ("run", "Popen", "call", "check_call", "check_output")
    },
    "subprocess.getoutput": Launcher(0, "cmd", "shell"),
    "subprocess.getstatusoutput": Launcher(0, "cmd", "shell"),
    "asyncio.create_subprocess_exec": Launcher(0, "program", "program"),
    "asyncio.create_subprocess_shell": Launcher(0, "cmd", "shell"),
    **{
        f"os.{f}": Launcher(0, None, "program")
        for f in ("execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe")
    },
    **{
        f"os.{f}": Launcher(1, None, "program")
        for f in ("spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp")
    },
    "os.spawnvpe": Launcher(1, None, "program"),
    "os.posix_spawn": Launcher(0, None, "program"),
    "os.posix_spawnp": Launcher(0, None, "program"),
    "os.system": Launcher(0, None, "shell"),
    "os.popen": Launcher(0, None, "shell"),
}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass
class _Module:
    name: str
    path: str
    tree: ast.Module
    imports: dict[str, str] = field(default_factory=dict)  # local name -> qualified name
    assigns: dict[str, list[ast.expr]] = field(default_factory=dict)  # module level
    functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = field(default_factory=dict)
    # "<module>" or a function's dotted name -> (the function, the calls in its own body)
    units: dict[str, tuple[ast.FunctionDef | ast.AsyncFunctionDef | None, list[ast.Call]]] = field(
        default_factory=dict
    )
    commands: list[ast.List] = field(default_factory=list)  # {"command": [...]} values
    tree_of: _Tree | None = field(default=None, repr=False)  # the whole tree, parsed lazily

    @classmethod
    def parse(cls, root: Path, path: Path) -> _Module:
        tree = ast.parse(path.read_text(), str(path))
        m = cls(_module_name(root, path), str(path.relative_to(root)), tree)
        for stmt in tree.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                m.functions[stmt.name] = stmt
            m._import(stmt)  # module-level imports first: a function's own only add names
            for target, value in _assignments(stmt):
                m.assigns.setdefault(target, []).append(value)
        m._collect()
        return m

    def _import(self, node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                local = a.asname or a.name.split(".")[0]
                self.imports.setdefault(local, a.name if a.asname else local)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                self.imports.setdefault(a.asname or a.name, f"{node.module}.{a.name}")

    def _collect(self) -> None:
        """One walk of the tree: each function's own calls, lazy imports, pod command lists."""
        self.units["<module>"] = (None, [])
        stack: list[tuple[ast.AST, str, str]] = [(self.tree, "<module>", "")]
        while stack:
            node, unit, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{prefix}{child.name}"
                    self.units[name] = (child, [])
                    stack.append((child, name, f"{name}."))
                    continue
                if isinstance(child, ast.ClassDef):
                    stack.append((child, unit, f"{prefix}{child.name}."))
                    continue
                if isinstance(child, ast.Call):
                    self.units[unit][1].append(child)
                elif isinstance(child, ast.Dict):
                    self.commands.extend(
                        v
                        for k, v in zip(child.keys, child.values, strict=True)
                        if isinstance(k, ast.Constant) and k.value == "command"
                        if isinstance(v, ast.List)
                    )
                elif isinstance(child, ast.Import | ast.ImportFrom):
                    self._import(child)
                stack.append((child, unit, prefix))

    def find_function(
        self, func: ast.expr
    ) -> tuple[_Module, ast.FunctionDef | ast.AsyncFunctionDef] | None:
        """The module-level function `func` names, in this module or another of the tree."""
        if isinstance(func, ast.Name) and func.id in self.functions:
            return self, self.functions[func.id]
        name = self.qualify(func)
        if not name or "." not in name:
            return None
        module, _, fname = name.rpartition(".")
        other = self.tree_of.module(module) if self.tree_of else None
        if other is not None and fname in other.functions:
            return other, other.functions[fname]
        return None

    def qualify(self, func: ast.expr) -> str | None:
        """`subprocess.run`, `nsutil.run_in`, a bare function of this module: its full name."""
        if isinstance(func, ast.Name):
            if func.id in self.imports:
                return self.imports[func.id]
            if func.id in self.functions:
                return f"{self.name}.{func.id}"
            return None
        if isinstance(func, ast.Attribute):
            base = self.qualify_value(func.value)
            return f"{base}.{func.attr}" if base else None
        return None

    def qualify_value(self, expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return self.imports.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.qualify_value(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None


def _assignments(node: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    if isinstance(node, ast.Assign):
        for t in node.targets:
            if isinstance(t, ast.Name):
                yield t.id, node.value
    elif (
        isinstance(node, ast.AnnAssign | ast.NamedExpr)
        and isinstance(node.target, ast.Name)
        and node.value is not None
    ):
        yield node.target.id, node.value


class _Scope:
    """Where a name is looked up: the enclosing function (if any), then the module."""

    def __init__(
        self, module: _Module, func: ast.FunctionDef | ast.AsyncFunctionDef | None
    ) -> None:
        self.module = module
        self.func = func
        self.locals: dict[str, list[ast.expr]] = {}
        self.params: dict[str, str] = {}  # name -> "argv" for *args, "value" otherwise
        if func is not None:
            a = func.args
            for p in (*a.posonlyargs, *a.args, *a.kwonlyargs):
                self.params[p.arg] = "value"
            if a.vararg:
                self.params[a.vararg.arg] = "varargs"
            for node in ast.walk(func):
                for target, value in _assignments(node):
                    self.locals.setdefault(target, []).append(value)


_DEPTH = 8


def _resolve_program(expr: ast.expr, scope: _Scope, depth: int = 0) -> set[Outcome]:
    """What the expression `expr`, a program, can be."""
    if depth > _DEPTH:
        return {Unresolved("too many steps to follow")}
    d = depth + 1
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value} if expr.value else {Unresolved("an empty program")}
    if isinstance(expr, ast.Constant) and expr.value is None:
        return set()  # `which(...) or None`: where nothing is found, nothing runs
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div):
        names = _resolve_program(expr.right, scope, d)  # Path(...) / "name"
        if _is_venv_bin(expr.left, scope):
            return {VENV_BIN + n if isinstance(n, str) else n for n in names}
        return names
    if isinstance(expr, ast.Attribute) and scope.module.qualify_value(expr) == "sys.executable":
        return {INTERPRETER}
    if isinstance(expr, ast.Name):
        return _resolve_name(expr.id, scope, d, "program")
    if isinstance(expr, ast.BoolOp):
        return set().union(*(_resolve_program(v, scope, d) for v in expr.values))
    if isinstance(expr, ast.IfExp):
        return _resolve_program(expr.body, scope, d) | _resolve_program(expr.orelse, scope, d)
    if isinstance(expr, ast.Subscript) and _is_zero(expr.slice):
        return _resolve_argv(expr.value, scope, d)
    if isinstance(expr, ast.Call):
        name = scope.module.qualify(expr.func)
        if name in ("shutil.which", "str", "os.fspath", "pathlib.Path") or (
            isinstance(expr.func, ast.Name) and expr.func.id in ("str", "Path")
        ):
            return _resolve_program(expr.args[0], scope, d) if expr.args else {Unresolved("")}
        return _resolve_returns(expr, scope, d, _resolve_program)
    return {Unresolved(f"the program is {ast.unparse(expr)!r}")}


def _resolve_argv(expr: ast.expr, scope: _Scope, depth: int = 0) -> set[Outcome]:
    """What the first item of `expr`, an argv, can be."""
    if depth > _DEPTH:
        return {Unresolved("too many steps to follow")}
    d = depth + 1
    if isinstance(expr, ast.List | ast.Tuple):
        out: set[Outcome] = set()
        i = 0
        while i < len(expr.elts) and isinstance(starred := expr.elts[i], ast.Starred):
            # [*prefix, *argv]: where the prefix may be empty, the next item may be first.
            out |= _resolve_argv(starred.value, scope, d)
            if EMPTY not in out:
                return out
            out.discard(EMPTY)
            i += 1
        if i == len(expr.elts):
            return out | {EMPTY}
        out |= _resolve_program(expr.elts[i], scope, d)
        words = [e.value if isinstance(e, ast.Constant) else None for e in expr.elts[:4]]
        if i == 0 and words[:3] == ["ip", "netns", "exec"] and len(expr.elts) > 4:
            out |= _resolve_argv(ast.List(expr.elts[4:]), scope, d)  # what ip runs in the netns
        return out
    if isinstance(expr, ast.Name):
        return _resolve_name(expr.id, scope, d, "argv")
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        return _resolve_argv(expr.left, scope, d)
    if isinstance(expr, ast.IfExp):
        return _resolve_argv(expr.body, scope, d) | _resolve_argv(expr.orelse, scope, d)
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return _first_word(expr.value)
    if isinstance(expr, ast.Call):
        name = scope.module.qualify(expr.func)
        builtin = expr.func.id if isinstance(expr.func, ast.Name) else None
        if builtin in ("list", "tuple") and expr.args:
            return _resolve_argv(expr.args[0], scope, d)
        if name == "shlex.split" and expr.args:
            arg = expr.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return _first_word(arg.value)
            return {Unresolved(f"shlex.split of {ast.unparse(arg)!r}")}
        return _resolve_returns(expr, scope, d, _resolve_argv)
    return {Unresolved(f"the argv is {ast.unparse(expr)!r}")}


def _is_venv_bin(expr: ast.expr, scope: _Scope) -> bool:
    """`Path(sys.executable).parent`: the venv's bin directory."""
    return (
        isinstance(expr, ast.Attribute)
        and expr.attr == "parent"
        and isinstance(expr.value, ast.Call)
        and len(expr.value.args) == 1
        and isinstance(expr.value.args[0], ast.Attribute)
        and scope.module.qualify_value(expr.value.args[0]) == "sys.executable"
    )


def _first_word(command: str) -> set[Outcome]:
    words = command.split()
    return {words[0]} if words else {Unresolved("an empty command")}


def _is_zero(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and expr.value == 0


def _resolve_name(name: str, scope: _Scope, depth: int, kind: str) -> set[Outcome]:
    resolve = _resolve_argv if kind == "argv" else _resolve_program
    if name in scope.locals:
        return set().union(*(resolve(v, scope, depth) for v in scope.locals[name]))
    if name in scope.params:
        # A `*argv` parameter is itself the argv; a plain one holds what the caller passed.
        if scope.params[name] == "varargs":
            return {Param(name, "varargs")} if kind == "argv" else {Unresolved("*args")}
        return {Param(name, kind)}
    if name in scope.module.assigns:
        top = _Scope(scope.module, None)
        return set().union(*(resolve(v, top, depth) for v in scope.module.assigns[name]))
    return {Unresolved(f"{name} is not a constant of {scope.module.path}")}


def _resolve_returns(
    call: ast.Call,
    scope: _Scope,
    depth: int,
    resolve: Callable[[ast.expr, _Scope, int], set[Outcome]],
) -> set[Outcome]:
    """A call of a function of the tree: what its return statements can be."""
    found = scope.module.find_function(call.func)
    if found is None:
        return {Unresolved(f"the result of {ast.unparse(call.func)}()")}
    module, fn = found
    inner = _Scope(module, fn)
    out: set[Outcome] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Return) and node.value is not None:
            for o in resolve(node.value, inner, depth):
                # The callee's parameters are the caller's arguments: not followed that far.
                out.add(
                    Unresolved(f"{fn.name}() builds it from {o.name}")
                    if isinstance(o, Param)
                    else o
                )
    return out or {Unresolved(f"{fn.name}() returns nothing")}


# --- the scan --------------------------------------------------------------------------------


def python_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(".py"):
                yield Path(dirpath) / f


def yaml_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith((".yaml", ".yml")):
                yield Path(dirpath) / f


def _argument(call: ast.Call, launcher: Launcher) -> ast.expr | None:
    if launcher.keyword:
        for kw in call.keywords:
            if kw.arg == launcher.keyword:
                return kw.value
    positional = call.args
    if len(positional) > launcher.index and not any(
        isinstance(a, ast.Starred) for a in positional[: launcher.index]
    ):
        return positional[launcher.index]
    return None


def _site_outcomes(call: ast.Call, launcher: Launcher, scope: _Scope) -> set[Outcome]:
    if launcher.kind == "argv":
        for kw in call.keywords:
            if kw.arg == "executable":
                return _resolve_program(kw.value, scope)
    arg = _argument(call, launcher)
    if arg is None:
        return {Unresolved("no program argument")}
    if launcher.kind == "argv":
        return _resolve_argv(arg, scope)
    if isinstance(arg, ast.Starred):
        return _resolve_argv(arg.value, scope)  # f(*argv): argv's first item is the program
    if launcher.kind == "shell":
        return _resolve_argv(arg, scope)
    return _resolve_program(arg, scope)


def _as_launcher(fn: ast.FunctionDef | ast.AsyncFunctionDef, param: Param) -> Launcher:
    a = fn.args
    positional = [p.arg for p in (*a.posonlyargs, *a.args)]
    if param.kind == "varargs":
        return Launcher(len(positional), None, "program")
    index = positional.index(param.name) if param.name in positional else 10**6
    return Launcher(index, param.name, param.kind)


class _Tree:
    """The tree's Python files, each parsed only once something may start a program in it."""

    # Words without which a file cannot start a program (the wrappers' names are added as
    # they are found).
    WORDS = (
        "subprocess", "execv", "execl", "spawnv", "spawnl", "posix_spawn", "system(", "popen(",
        '"command"', "'command'",
    )  # fmt: skip

    def __init__(self, root: Path) -> None:
        self.root = root
        self.texts = {_module_name(root, p): (p, p.read_text()) for p in python_files(root)}
        self.parsed: dict[str, _Module] = {}

    def module(self, name: str) -> _Module | None:
        """The module of that name (benchmarks import theirs without "benchmarks.")."""
        if name not in self.texts:
            name = next((n for n in self.texts if n.endswith("." + name)), name)
        if name not in self.texts:
            return None
        if name not in self.parsed:
            m = _Module.parse(self.root, self.texts[name][0])
            m.tree_of = self
            self.parsed[name] = m
        return self.parsed[name]

    def relevant(self, words: Iterable[str]) -> list[_Module]:
        ws = tuple(words)
        names = [n for n, (_, text) in self.texts.items() if any(w in text for w in ws)]
        return [m for n in names if (m := self.module(n)) is not None]


def scan(root: Path = ROOT) -> list[Site]:
    """Every site in the tree's Python and cluster files that starts a program."""
    tree = _Tree(root)
    launchers = dict(_STDLIB_LAUNCHERS)
    words: set[str] = set(_Tree.WORDS)
    # Wrappers are found as the scan goes; each round may find callers that are wrappers too.
    while True:
        sites: list[Site] = []
        found: dict[str, Launcher] = {}
        modules = tree.relevant(words)
        for m in modules:
            for fname, (fn, calls) in m.units.items():
                sites.extend(_sites(m, fname, fn, calls, launchers, found))
        new = {k: v for k, v in found.items() if k not in launchers}
        if not new:
            break
        launchers.update(new)
        words |= {k.rpartition(".")[2] + "(" for k in new}
    for m in modules:
        sites.extend(_command_dicts(m))
    for path in yaml_files(root):
        sites.extend(_cluster_file_commands(root, path))
    return sorted(sites, key=lambda s: (s.path, s.line))


def _sites(
    m: _Module,
    fname: str,
    fn: ast.FunctionDef | ast.AsyncFunctionDef | None,
    calls: list[ast.Call],
    launchers: Mapping[str, Launcher],
    found: dict[str, Launcher],
) -> Iterator[Site]:
    """The sites among one function's calls; a function that passes its parameter on as the
    program is itself a launcher (into `found`), and its callers' calls are the sites."""
    scope: _Scope | None = None
    for call in calls:
        name = m.qualify(call.func)
        launcher = launchers.get(name) if name else None
        if launcher is None:
            continue
        scope = scope or _Scope(m, fn)
        outcomes = _site_outcomes(call, launcher, scope)
        params = [o for o in outcomes if isinstance(o, Param)]
        if params and fn is not None and "." not in fname:
            for p in params:
                found[f"{m.name}.{fname}"] = _as_launcher(fn, p)
            outcomes = {o for o in outcomes if not isinstance(o, Param)}
            if not outcomes:
                continue
        outcomes = {
            Unresolved(f"{fname}'s parameter {o.name} (a method or nested function)")
            if isinstance(o, Param)
            else o
            for o in outcomes
        } or {Unresolved("never names a program")}
        yield Site(m.path, call.lineno, fname, frozenset(outcomes))


def _command_dicts(m: _Module) -> Iterator[Site]:
    """`{"command": [...]}` in Python: a pod of a cluster file written in code."""
    scope = _Scope(m, None)
    for v in m.commands:
        outcomes = _resolve_argv(v, scope)
        yield Site(m.path, v.lineno, "<pod command>", frozenset(_pod(outcomes)))


def _pod(outcomes: set[Outcome]) -> set[Outcome]:
    return {INTERPRETER if o == "{python}" else o for o in outcomes}


def _cluster_file_commands(root: Path, path: Path) -> Iterator[Site]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError:
        return
    for doc in docs:
        pods = doc.get("pods") if isinstance(doc, dict) else None
        for pod in pods if isinstance(pods, list) else ():
            command = pod.get("command") if isinstance(pod, dict) else None
            if isinstance(command, list) and command and isinstance(command[0], str):
                program = os.path.basename(command[0])
                outcome: Outcome = INTERPRETER if command[0] == "{python}" else program
                yield Site(str(path.relative_to(root)), 0, "<yaml>", frozenset({outcome}))


_MAKE_VAR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(.*)$")
_SHELL_BUILTINS = frozenset({"cd", "echo", "exit", "export", "set", "test", "[", "true", ":"})


def makefile_sites(path: Path, root: Path = ROOT) -> list[Site]:
    """The program of each command in the Makefile's recipes (variables expanded)."""
    lines: list[tuple[int, str]] = []  # a line continued with "\\" is one, at its first number
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if lines and lines[-1][1].endswith("\\"):
            lines[-1] = (lines[-1][0], lines[-1][1][:-1] + " " + raw.strip())
        else:
            lines.append((n, raw))
    variables = {m[1]: m[2] for _, line in lines if (m := _MAKE_VAR.match(line))}

    def expand(text: str, depth: int = 0) -> str:
        out = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], ""), text)
        return out if out == text or depth > 8 else expand(out, depth + 1)

    sites = []
    for n, line in lines:
        if not line.startswith("\t"):
            continue
        for command in re.split(r"&&|\|\||;|\|", expand(line.strip().lstrip("@-"))):
            words = [w for w in command.split() if not re.match(r"^\w+=", w)]
            if not words or words[0] in _SHELL_BUILTINS:
                continue
            program = words[0]
            if program.startswith(".venv/bin/"):
                program = VENV_BIN + program.removeprefix(".venv/bin/")
            sites.append(Site(str(path.relative_to(root)), n, "<recipe>", frozenset({program})))
    return sites


def unlisted(sites: Sequence[Site], listed: Mapping[str, str]) -> list[str]:
    """Each named program of `sites` that is neither listed nor our own."""
    return sorted(
        f"{s.where}: runs {p!r}, not in scripts/programs.txt"
        for s in sites
        for p in s.programs()
        if os.path.basename(p) not in listed and not is_own(p)
    )


# --- while tests run -------------------------------------------------------------------------


class ProgramGuard:
    """An audit hook: every program this process starts is recorded if it is not listed.

    `ip netns exec NS PROG ...` counts PROG too. Audit hooks cannot be removed, so one guard
    is installed once per process; `current` names what is running (a test's id)."""

    def __init__(self, listed: Mapping[str, str]) -> None:
        self.listed = dict(listed)
        self.current = "collection"
        self.violations: list[tuple[str, str]] = []

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def check(self, argv: Sequence[object]) -> None:
        if not argv:
            return
        program = os.fsdecode(argv[0]) if isinstance(argv[0], str | bytes | os.PathLike) else ""
        if os.path.isabs(program) and not os.path.exists(program):
            return  # nothing runs (a test of a command that cannot start)
        if not is_own(program) and os.path.basename(program) not in self.listed:
            self.violations.append((self.current, program))
        if os.path.basename(program) == "ip" and [str(a) for a in argv[1:3]] == ["netns", "exec"]:
            self.check(argv[4:])

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        # Called for every audit event of the process: return at once for the others.
        if event == "subprocess.Popen":
            executable, argv = args[0], args[1]
            if isinstance(argv, str | bytes | os.PathLike):
                argv = [argv]
            if executable is not None:
                argv = [executable, *list(argv)[1:]]  # type: ignore[call-overload]
            self.check(list(argv))  # type: ignore[call-overload]
        elif event in ("os.exec", "os.posix_spawn"):
            self.check([args[0], *list(args[1])[1:]])  # type: ignore[call-overload]
        elif event == "os.spawn":
            self.check([args[1], *list(args[2])[1:]])  # type: ignore[call-overload]
        elif event == "os.system":
            self.check(os.fsdecode(args[0]).split())  # type: ignore[arg-type]
