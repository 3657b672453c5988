"""Honest test grading: the trusted parent splits each assert, the sandbox only evaluates the calls.

``plan_tests`` turns tests (MBPP-style assert strings, or a HumanEval ``def check(candidate)`` block) into
items sent into the sandbox: for a splittable assert such as ``assert f(3) == 9`` only ``f(3)`` goes in, and
the parent keeps ``__v0 == 9``. ``grade`` reads the nonce-tagged records that came back, decodes the plain
values and evaluates each assert itself, so exiting early, printing "passed", patching builtins or returning
objects whose ``__eq__`` lies cannot pass a test. A test is run whole inside the sandbox (weaker verdict:
the program could tamper with it from inside) when it uses names the parent cannot resolve (helpers or
classes of the program, loops or statements in a check block, modules outside ``SAFE_MODULES``).
"""

from __future__ import annotations

import ast
import builtins
import collections
import importlib
import json
from dataclasses import dataclass, field

SAFE_MODULES = ("math", "cmath", "string", "re", "itertools", "functools", "operator", "collections", "heapq")
SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in (
        "abs all any bool bytes chr complex dict divmod enumerate filter float frozenset hash int isinstance "
        "len list map max min ord pow range repr reversed round set sorted str sum tuple type zip "
        "Exception ValueError TypeError"
    ).split()
}
VALUE_REPR_CHARS = 200
MAX_PARSE_CHARS = 256 << 10  # the parent does not parse longer programs (the sandbox still runs them)


@dataclass
class PlannedTest:
    source: str
    split: bool
    expr: ast.Expression | None = None  # split: the assert's test with calls replaced by __v<k>
    items: list[int] = field(default_factory=list)  # indices into TestPlan.items


@dataclass
class TestPlan:
    items: list[dict]  # {"kind": "call" | "whole", "src": str}, sent into the sandbox
    tests: list[PlannedTest]
    setup: str = ""  # module-level statements of a check block (imports, METADATA), run after the program
    parent_names: dict = field(default_factory=dict)  # names the parent may use when evaluating asserts
    __test__ = False


def parse_program(program: str) -> ast.Module | None:
    """The program's syntax tree, or None when the parent cannot parse it: a syntax error, a null byte, or
    code degenerate enough to exhaust the parser (``"1+" * 10**6`` nests past the recursion limit, deep
    brackets, huge sources). The program then only runs in the sandbox, which gives the verdict."""
    if len(program) > MAX_PARSE_CHARS:
        return None
    try:
        return ast.parse(program)
    except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError):
        return None


def _defined_names(tree: ast.Module | None) -> set[str]:
    """Top-level names the program defines (functions, classes, assignments, imports); empty if unparsable."""
    if tree is None:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Import):  # a safe module imported under its own name is the parent's too
            names.update(
                a.asname or a.name.split(".")[0] for a in node.names if a.asname or a.name not in SAFE_MODULES
            )
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        else:
            names.update(
                n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            )
    return names


def _defined_classes(tree: ast.Module | None) -> set[str]:
    """Top-level classes the program defines (their instances cannot come back as plain values)."""
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)} if tree is not None else set()


def _bound_names(expr: ast.AST) -> set[str]:
    """Names bound inside the expression itself (comprehension targets, lambda args)."""
    bound = set()
    for node in ast.walk(expr):
        if isinstance(node, ast.comprehension):
            bound.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Lambda):
            bound.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
    return bound


class _CallExtractor(ast.NodeTransformer):
    """Replace each outermost call to one of ``call_names`` by a placeholder ``__v<k>``."""

    def __init__(self, call_names: set[str], rename: dict[str, str], first: int) -> None:
        self.call_names, self.rename, self.first, self.calls = call_names, rename, first, []

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Name) and node.func.id in self.call_names:
            call = _Renamer(self.rename).visit(ast.parse(ast.unparse(node), mode="eval").body)
            self.calls.append(ast.unparse(call))
            return ast.copy_location(
                ast.Name(id=f"__v{self.first + len(self.calls) - 1}", ctx=ast.Load()), node
            )
        return self.generic_visit(node)


class _Renamer(ast.NodeTransformer):
    def __init__(self, rename: dict[str, str]) -> None:
        self.rename = rename

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.copy_location(ast.Name(id=self.rename.get(node.id, node.id), ctx=node.ctx), node)


def _check_block(tree: ast.Module) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)


def _setup_statement_ok(node: ast.stmt) -> bool:
    """Module-level statements of a check block the parent can mirror: safe imports and literal assignments."""
    if isinstance(node, ast.Import):
        return all(a.name in SAFE_MODULES for a in node.names)
    if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
        try:
            ast.literal_eval(node.value)
            return True
        except ValueError:
            return False
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)  # docstring


def _parent_names(setup: list[ast.stmt]) -> dict:
    names: dict = {"__builtins__": SAFE_BUILTINS}
    names.update({m: importlib.import_module(m) for m in SAFE_MODULES})
    for node in setup:
        if isinstance(node, ast.Import):
            names.update({a.asname or a.name: importlib.import_module(a.name) for a in node.names})
        elif isinstance(node, ast.Assign):
            names.update({t.id: ast.literal_eval(node.value) for t in node.targets})
    return names


def plan_tests(program: str, tests: list[str], entry_point: str | None = None) -> TestPlan:
    """Split ``tests`` into sandbox items and parent-side asserts (see module docstring).

    ``tests``: assert statements (one per string; strings that are only imports count as setup), or one
    string holding a HumanEval-style ``def check(candidate)`` block, whose ``candidate`` is ``entry_point``
    (default: the program's last top-level function).
    """
    program_tree = parse_program(program)
    defined, classes = _defined_names(program_tree), _defined_classes(program_tree)
    last_function = _last_function(program_tree)
    items: list[dict] = []
    planned: list[PlannedTest] = []
    setup_nodes: list[ast.stmt] = []
    whole_setup: list[str] = []
    for source in tests:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            raise ValueError(f"test {source[:80]!r} is not valid Python: {e}") from e
        check = _check_block(tree)
        if check is not None:
            entry = entry_point or last_function
            if entry is None:
                raise ValueError(
                    "a check(candidate) block needs entry_point (the program defines no function)"
                )
            others = [n for n in tree.body if n is not check]
            body = [
                n for n in check.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            ]
            if all(_setup_statement_ok(n) for n in others) and all(isinstance(n, ast.Assert) for n in body):
                setup_nodes += others
                known = set(_parent_names(setup_nodes)) | set(SAFE_BUILTINS)
                arg = check.args.args[0].arg if check.args.args else "candidate"
                for node in body:
                    _plan_assert(
                        node, {arg, entry}, {arg: entry}, defined, known - {arg, entry}, items, planned
                    )
            else:
                items.append({"kind": "whole", "src": f"{source}\ncheck({entry})\n"})
                planned.append(PlannedTest(source=source, split=False, items=[len(items) - 1]))
            continue
        if tree.body and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
            whole_setup.append(source)
            continue
        if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert):
            known = set(SAFE_MODULES) | set(SAFE_BUILTINS)
            calls = {entry_point} if entry_point else _called_names(tree.body[0]) - (known - defined)
            calls -= classes  # ``Pair(2, 1)`` builds a program object, not a plain value: the test runs whole
            _plan_assert(tree.body[0], calls, {}, defined, known - defined, items, planned, source)
        else:
            items.append({"kind": "whole", "src": source})
            planned.append(PlannedTest(source=source, split=False, items=[len(items) - 1]))
    setup = "\n".join([*(ast.unparse(n) for n in setup_nodes), *whole_setup])
    return TestPlan(items=items, tests=planned, setup=setup, parent_names=_parent_names(setup_nodes))


def _plan_assert(node, call_names, rename, defined, known, items, planned, source=None) -> None:
    """Plan one assert: split (calls go in, the parent evaluates) when every other name is known to the
    parent; whole when it needs program names; skipped when it tests nothing of the program (``assert True``)."""
    source = source or ast.unparse(_Renamer(rename).visit(ast.parse(ast.unparse(node)).body[0]))
    extractor = _CallExtractor(call_names, rename, 0)
    expr = extractor.visit(ast.parse(ast.unparse(node.test), mode="eval"))
    used = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
    placeholders = {f"__v{k}" for k in range(len(extractor.calls))}
    program_names = defined | call_names | set(rename)
    if not extractor.calls and not used & program_names:
        return
    bound = _bound_names(expr)
    call_uses = {
        n.id for call in extractor.calls for n in ast.walk(ast.parse(call)) if isinstance(n, ast.Name)
    }
    if not extractor.calls or used - placeholders - bound - known or call_uses & bound:
        src = ast.unparse(_Renamer(rename).visit(ast.parse(ast.unparse(node))))
        items.append({"kind": "whole", "src": src})
        planned.append(PlannedTest(source=source, split=False, items=[len(items) - 1]))
        return
    first = len(items)
    items.extend({"kind": "call", "src": call} for call in extractor.calls)
    expr = _Renamer({f"__v{k}": f"__v{first + k}" for k in range(len(extractor.calls))}).visit(expr)
    planned.append(
        PlannedTest(
            source=source,
            split=True,
            expr=ast.fix_missing_locations(expr),
            items=list(range(first, len(items))),
        )
    )


def _called_names(node: ast.AST) -> set[str]:
    """Names called in ``node`` (``f(...)``); without an entry point, those the parent does not know are
    taken to be the program's functions (a missing one fails inside with NameError)."""
    return {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _last_function(tree: ast.Module | None) -> str | None:
    if tree is None:
        return None
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names[-1] if names else None


# ---------------------------------------------------------------- records
DECODERS = {
    "none": lambda: None,
    "bool": bool,
    "int": lambda x: int(x, 16),
    "float": float.fromhex,
    "complex": lambda x: complex(float.fromhex(x[0]), float.fromhex(x[1])),
    "str": str,
    "bytes": bytes.fromhex,
    "list": lambda x: [decode(v) for v in x],
    "tuple": lambda x: tuple(decode(v) for v in x),
    "set": lambda x: {decode(v) for v in x},
    "frozenset": lambda x: frozenset(decode(v) for v in x),
    "dict": lambda x: {decode(k): decode(v) for k, v in x},
    "Counter": lambda x: collections.Counter({decode(k): decode(v) for k, v in x}),
    "OrderedDict": lambda x: collections.OrderedDict((decode(k), decode(v)) for k, v in x),
    "defaultdict": lambda x: collections.defaultdict(None, {decode(k): decode(v) for k, v in x}),
    "deque": lambda x: collections.deque(decode(v) for v in x),
}


def decode(tagged: list):
    """Tagged JSON from inside.encode -> the plain value (raises ValueError on anything malformed)."""
    if not isinstance(tagged, list) or not tagged or tagged[0] not in DECODERS:
        raise ValueError(f"malformed value record {str(tagged)[:80]}")
    try:
        return DECODERS[tagged[0]](*tagged[1:])
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise ValueError(f"malformed value record {str(tagged)[:80]}: {e}") from e


def parse_records(raw: bytes, nonce: str, n_items: int) -> tuple[dict | None, dict[int, dict], bool, bool]:
    """-> (load record, item records by index, ended, tampered). Any line without the nonce, malformed,
    duplicated, out of range or after the end marker marks the run tampered."""
    load, found, ended, tampered = None, {}, False, False
    for line in raw.split(b"\n"):
        if not line:
            continue
        tag, _, body = line.partition(b" ")
        try:
            record = json.loads(body) if tag == nonce.encode() else None
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or ended:
            tampered = True
            continue
        kind, index = record.get("k"), record.get("i")
        if kind == "end":
            ended = True
        elif kind == "load" and load is None:
            load = record
        elif kind == "item" and isinstance(index, int) and 0 <= index < n_items and index not in found:
            found[index] = record
        else:
            tampered = True
    return load, found, ended, tampered


def short_repr(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int (or a container of one) past Python's 4300-digit str conversion limit
        text = f"<{type(value).__name__} too large to print>"
    except RecursionError:  # a deeply nested container
        text = f"<{type(value).__name__} too deeply nested to print>"
    return text if len(text) <= VALUE_REPR_CHARS else text[: VALUE_REPR_CHARS - 3] + "..."
