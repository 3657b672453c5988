"""Arrow schemas of every table turntree stores, as constants with ``schema_version`` metadata.

Each schema carries ``b"schema_version"`` and ``b"table"`` in its metadata. Writers validate against these
(``runtime.tableio.write_table``) and readers refuse an unknown version (``runtime.tableio.read_table``).
Bump a table's version when a change is not backwards compatible, and list readable versions in
``READABLE_VERSIONS``.

An older readable version is brought up to the current one on read by ``schemas.upgrades`` (added nullable
columns come back as nulls; a changed encoding is translated).

Trees are one row per tree with ``nodes: list<struct>`` (``parent_id`` −1 at a root): Arrow has no recursive
types. Token ids are int32, log-probs float32.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
# version 2 of the rollout tables: ``policy_version``, the version of the policy that generated a row (the number
# of updates behind its checkpoint: 0 = the starting policy), so that an asynchronous pipeline can bound and
# correct staleness (flows.pipeline, max_staleness)
ROLLOUT_VERSION = "2"
# version 3 of trajectories and trees, version 2 of eval_results: ``no_verdict``, the one place that says the
# sandbox gave no verdict on a program (it failed twice on it). It replaces three encodings: a ``sandbox_error``
# reward component (trajectories), a null reward plus ``pruned`` (tree nodes), a transient row key (evaluation)
VERDICT_VERSION = "3"
EVAL_VERSION = "2"

TOKENS = pa.list_(pa.int32())
FLOATS = pa.list_(pa.float32())


def _with_meta(name: str, fields: list[pa.Field], version: str = SCHEMA_VERSION) -> pa.Schema:
    return pa.schema(fields, metadata={b"table": name.encode(), b"schema_version": version.encode()})


# --- problems -------------------------------------------------------------------------------------------
# One row per problem. Code problems carry tests; math problems carry a reference answer.
PROBLEMS = _with_meta(
    "problems",
    [
        pa.field("problem_id", pa.string(), nullable=False),  # unique, e.g. "HumanEval/0", "gsm8k/test/12"
        pa.field(
            "source", pa.string(), nullable=False
        ),  # humaneval | mbpp | gsm8k | math | synthetic:... | file
        pa.field("kind", pa.string(), nullable=False),  # "code" | "math"
        pa.field("prompt", pa.string(), nullable=False),  # task text as shown to the model
        pa.field("entry_point", pa.string()),  # function name the tests call (code)
        pa.field(
            "tests", pa.list_(pa.string())
        ),  # assert statements, or one HumanEval check(candidate) block
        pa.field("test_format", pa.string(), nullable=False),  # "asserts" | "check" | "none"
        pa.field("answer", pa.string()),  # reference final answer (math), normalised text
        pa.field("reference_solution", pa.string()),  # canonical program / worked solution
        pa.field("demonstration", pa.string()),  # tool-using transcript for warm start (synthetic tool-arith)
        pa.field("difficulty", pa.string()),  # benchmark level / synthetic knob, when known
        pa.field("split", pa.string(), nullable=False),  # "train" | "eval"
        pa.field("meta", pa.string()),  # JSON object with source-specific extras
    ],
)

# --- TIR trajectories (GTPO / GRPO) -----------------------------------------------------------------------
TURN = pa.struct(
    [
        pa.field("turn_idx", pa.int32(), nullable=False),  # 0-based position in the trajectory
        pa.field("completion_token_ids", TOKENS, nullable=False),  # y_ij exactly as generated
        pa.field("completion_logprobs", FLOATS, nullable=False),  # rollout log π_old(y_ij,t), same length
        pa.field(
            "observation_token_ids", TOKENS, nullable=False
        ),  # b_ij fed back (loss mask 0); may be empty
        pa.field("text", pa.string()),  # decoded completion (for reading; ids are the truth)
        pa.field("code", pa.string()),  # the code block of this turn, if any
        pa.field("tool_call", pa.string(), nullable=False),  # "none" | "valid" | "invalid"
        pa.field(
            "exec_status", pa.string(), nullable=False
        ),  # "none"|"ok"|"error"|"timeout"|"syntax_error"|...
        pa.field("exec_output", pa.string()),  # observation text (truncated execution output)
        pa.field("turn_reward", pa.float32()),  # r_ij, filled by the score stage
    ]
)
TRAJECTORIES = _with_meta(
    "trajectories",
    [
        pa.field("trajectory_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),  # G trajectories of one problem share it
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("prompt_token_ids", TOKENS, nullable=False),  # the initial prompt (chat template applied)
        pa.field("turns", pa.list_(TURN), nullable=False),
        pa.field("final_answer", pa.string()),  # extracted \boxed{} answer or final program
        # "answer" | "max_turns" | "max_tokens" (turn cut by its token limit) | "context_limit" | "error"
        pa.field("stop_reason", pa.string(), nullable=False),
        pa.field("correct", pa.bool_()),  # filled by score
        pa.field("reward", pa.float32()),  # outcome reward r_i, filled by score
        pa.field("reward_components", pa.map_(pa.string(), pa.float32())),  # name -> value, filled by score
        pa.field("policy_version", pa.int32()),  # updates behind the checkpoint that generated it (v2)
        # True: the sandbox gave no verdict on the program (failed twice): no reward, never trained; False: it
        # did (or no program to judge); null: not scored yet (v3; written by score)
        pa.field("no_verdict", pa.bool_()),
    ],
    VERDICT_VERSION,
)

# --- MURPHY rollout trees ---------------------------------------------------------------------------------
NODE = pa.struct(
    [
        pa.field("node_id", pa.int32(), nullable=False),  # position in this tree's nodes list
        pa.field("parent_id", pa.int32(), nullable=False),  # node_id of the parent, -1 at a root
        pa.field("depth", pa.int32(), nullable=False),  # 1 at a root (turn number)
        pa.field("prompt_token_ids", TOKENS, nullable=False),  # task, or task + parent attempt + feedback
        pa.field("completion_token_ids", TOKENS, nullable=False),
        pa.field("completion_logprobs", FLOATS, nullable=False),
        pa.field("text", pa.string()),
        pa.field("code", pa.string()),
        pa.field("exec_result", pa.string()),  # feedback_text of this attempt's test run
        pa.field("tests_passed", pa.int32()),
        pa.field("tests_total", pa.int32()),
        pa.field("reward", pa.float32()),  # r(n), filled by score
        pa.field("ret", pa.float32()),  # propagated return R(n) (MaRS/MeRS), filled by advantages
        pa.field("pruned", pa.bool_(), nullable=False),  # dropped by pruning (InterP/IntraP/zero signal)
        # True: the sandbox failed twice on this node's program (no counts, no reward; its tree is not trained);
        # null: not graded yet (v3; written by rollout when it grades, final after score)
        pa.field("no_verdict", pa.bool_()),
    ]
)
TREES = _with_meta(
    "trees",
    [
        pa.field("tree_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("nodes", pa.list_(NODE), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),  # the max_nodes budget cut this tree
        pa.field("policy_version", pa.int32()),  # of every node of the tree (one rollout call made them; v2)
    ],
    VERDICT_VERSION,
)

# --- training samples -------------------------------------------------------------------------------------
SAMPLES = _with_meta(
    "samples",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),  # trajectory_id, or tree_id/node_id
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("input_ids", TOKENS, nullable=False),  # (L,) prompt + completions + observations
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),  # (L,) 1 on generated tokens only
        pa.field("advantages", FLOATS, nullable=False),  # (L,) A_t, 0 where loss_mask is 0
        pa.field("rollout_logprobs", FLOATS, nullable=False),  # (L,) vLLM log π_old, 0 where mask is 0
        pa.field("algo", pa.string(), nullable=False),
        pa.field("policy_version", pa.int32()),  # of the rollout it came from (v2): staleness in the update
    ],
    ROLLOUT_VERSION,
)

# --- evaluation -------------------------------------------------------------------------------------------
EVAL_RESULTS = _with_meta(
    "eval_results",
    [
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),  # 1-based self-correction iteration
        pa.field("passed", pa.bool_(), nullable=False),  # all tests pass / answer correct
        pa.field("score", pa.float32(), nullable=False),  # fraction of tests passed, or 0/1 for math
        pa.field("num_turns", pa.int32(), nullable=False),
        pa.field("num_tool_calls", pa.int32(), nullable=False),
        pa.field("difficulty", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("feedback", pa.string()),
        # the sandbox failed twice on the attempt: counted as not passed (v2)
        pa.field("no_verdict", pa.bool_()),
    ],
    EVAL_VERSION,
)

ALL: dict[str, pa.Schema] = {
    s.metadata[b"table"].decode(): s for s in (PROBLEMS, TRAJECTORIES, TREES, SAMPLES, EVAL_RESULTS)
}

# Versions a reader of the current code can read, per table (older ones are upgraded on read: schemas.upgrades).
READABLE_VERSIONS: dict[str, set[str]] = {
    "problems": {"1"},
    "trajectories": {"1", "2", "3"},
    "trees": {"1", "2", "3"},
    "samples": {"1", "2"},
    "eval_results": {"1", "2"},
}
