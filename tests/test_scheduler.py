"""The schedulers with no model and no torch: admission, preemption and retirement decided on the
host, driven by made-up draws; each plan says which rows decode, which prompts prefill and which
rows move."""
from __future__ import annotations

import subprocess
import sys

from llama_gen.engine.baseline import StaticScheduler
from llama_gen.engine.blocks import BlockAllocator, OneBlockPerRow
from llama_gen.engine.requests import Draw, EngineStats, Request, SamplingParams
from llama_gen.engine.scheduler import Move, Prefill, Scheduler, StepPlan

STOP = 2


def request(n: int, max_gen_len: int | None, tag) -> Request:
    return Request([5] * n, SamplingParams(max_gen_len=max_gen_len), tag=tag)


def scheduler(blocks, rows: int, max_seq_len: int) -> Scheduler:
    return Scheduler(blocks, rows, max_seq_len, frozenset({STOP}), None, EngineStats())


def step(sched, token: int = 7) -> tuple[StepPlan | None, list]:
    """One step with every row drawing `token`: the plan and the completions it gave."""
    plan = sched.schedule()
    if plan is None:
        return None, []
    rows = len(plan.decode) + sum(len(p.prompts) for p in plan.prefills)
    return plan, list(sched.postprocess([Draw(token)] * rows))


def test_the_scheduler_module_never_imports_torch():
    code = ("import sys\n"
            "import llama_gen.engine.scheduler, llama_gen.engine.blocks, "
            "llama_gen.engine.requests, llama_gen.engine.limits\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admission_fills_free_rows_shortest_first_and_retirement_compacts_them():
    sched = scheduler(OneBlockPerRow(2, 32), rows=2, max_seq_len=32)
    sched.start(iter([request(6, 3, "a"), request(4, 1, "b"), request(5, 2, "c")]))
    plan, done = step(sched)
    # Two rows free: the two shortest of the window, prefilled side by side; none decodes.
    assert [(row, r.tag) for row, r in plan.loads] == [(0, "b"), (1, "c")]
    assert plan.prefills == [Prefill(0, [[5] * 4, [5] * 5])] and plan.decode == []
    assert [c.request.tag for c in done] == ["b"]  # max_gen_len 1: done at its first token
    plan, done = step(sched)
    # "c" moved from row 1 into row 0 (its prompt's 5 cached positions with it), reads them
    # and its first token's; "a" refills row 1.
    assert plan.moves == [Move(1, 0, 5)]
    assert plan.decode == [6] and [(row, r.tag) for row, r in plan.loads] == [(1, "a")]
    assert [c.request.tag for c in done] == ["c"] and done[0].tokens == [7, 7]
    assert sched.stats.refills == 1
    while (out := step(sched))[0] is not None:
        done += out[1]
    assert [c.request.tag for c in done] == ["c", "a"] and done[1].tokens == [7, 7, 7]


def test_a_stop_token_retires_a_row_and_the_rest_keep_running():
    sched = scheduler(OneBlockPerRow(2, 32), rows=2, max_seq_len=32)
    sched.start(iter([request(3, 5, "x"), request(3, 5, "y")]))
    step(sched)
    plan = sched.schedule()
    assert plan.decode == [4, 4]  # 3 prompt positions and the first token
    done = list(sched.postprocess([Draw(STOP), Draw(7)]))
    assert [(c.request.tag, c.finish_reason, c.stop_reason) for c in done] == [("x", "stop", STOP)]
    assert sched.schedule().moves == [Move(1, 0, 4)]


def test_out_of_blocks_the_newest_is_preempted_and_runs_again_from_its_prompt():
    blocks = BlockAllocator(n_blocks=4, block_size=4, rows=2, max_seq_len=16)
    sched = scheduler(blocks, rows=2, max_seq_len=16)
    sched.start(iter([request(3, 10, "old"), request(3, 10, "new")]))
    plans, done = [], []
    while (out := step(sched))[0] is not None:
        plans.append(out[0])
        done += out[1]
    assert sched.stats.preempted >= 1
    # The newest admitted went back to wait; its row's blocks were freed in the table sent.
    preempting = next(p for p in plans[1:] if p.loads)
    assert [r.tag for _, r in preempting.loads] == ["new"]
    assert sorted(c.request.tag for c in done) == ["new", "old"]
    assert all(c.tokens == [7] * 10 for c in done)  # generated again to the same tokens
    assert blocks.free_blocks == blocks.n_blocks  # every block came back
    assert sched.stats.peak_kv_tokens <= 16


def test_the_static_scheduler_forces_prompt_tokens_and_ends_a_batch_together():
    sched = StaticScheduler(OneBlockPerRow(2, 16), 2, 16, frozenset({STOP}), None, EngineStats())
    sched.start(iter([Request([1, 2, 3], SamplingParams(max_gen_len=2), tag="long"),
                      Request([4], SamplingParams(max_gen_len=1), tag="short")]))
    plan = sched.schedule()
    # Both rows start at the shortest prompt; the longer prompt's own tokens are forced.
    assert plan.prefills == [Prefill(0, [[1], [4]])] and plan.forced == {0: 2}
    assert list(sched.postprocess([Draw(2), Draw(9)])) == []
    plan = sched.schedule()
    assert plan.decode == [2, 2] and plan.forced == {0: 3}
    assert sched.stats.wasted_slot_steps == 1  # "short" is done but steps with the batch
    assert list(sched.postprocess([Draw(3), Draw(9)])) == []
    plan = sched.schedule()
    assert plan.forced == {}  # past every prompt: all rows draw
    assert list(sched.postprocess([Draw(8), Draw(9)])) == []
    sched.schedule()
    done = {c.request.tag: c.tokens for c in sched.postprocess([Draw(8), Draw(9)])}
    assert done == {"long": [8, 8], "short": [9]}  # a forced token is not generated
    assert sched.schedule() is None
