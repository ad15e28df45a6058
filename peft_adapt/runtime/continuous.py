"""Continuous batching: generation scheduled one decode step at a time, as vLLM, LoRAX and S-LoRA schedule it.

Every `iterate()` (in the batcher's worker thread, under the runtime's lock):
1. admits waiting jobs, oldest first, while the running rows stay within `max_rows` and the KV budget (the cache
   positions every row may come to hold, counted as the padded cache holds them); a job that does not fit waits;
2. reads one chunk (`prefill_chunk` columns) of one waiting prompt group: short prompts are read together in one
   chunk, a long prompt a chunk per iteration, so the running rows go on decoding while it is read; a group whose
   prompt is read joins the running batch;
3. runs one decode step of the running batch: every row takes its next token (its own sampling and seeded
   generator), rows that end (EOS, their limit, a stop sequence) or whose client went away leave, and the rest
   read their token.
Rows of any adapters, stacks and mixes share the step. Adapters whose method runs as a group (prefix tuning) are
served whole, one request at a time, between steps. With `batch_invariant` every row is its own batch, its prompt
read whole: it generates exactly what it generates alone. An adapter serving running rows is never evicted, and a
registry change to it takes effect once those rows have left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..errors import UserInputError
from ..faults import delay_point, fault_point
from .decoding import TextStream, generators_for
from .jobs import GenerationJob, advance, finish, log_unexpected
from .live_batch import LiveBatch, LiveRow, Prefill
from .residency import NoRoom

DEFAULT_KV_BUDGET = 32_768  # cache positions (tokens x rows) the running rows may hold
DEFAULT_PREFILL_CHUNK = 128  # prompt columns read per iteration


class ContinuousScheduler:
    def __init__(self, runtime, max_rows: int = 32, kv_budget: int = DEFAULT_KV_BUDGET,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, on_join: Callable[[int], None] | None = None):
        if kv_budget < 1 or prefill_chunk < 1 or max_rows < 1:
            raise UserInputError("max_rows, kv_budget and prefill_chunk must be positive")
        self.runtime = runtime
        self.max_rows, self.kv_budget, self.prefill_chunk = max_rows, kv_budget, prefill_chunk
        self.invariant = runtime.batch_invariant
        self.on_join = on_join
        self.waiting: deque[GenerationJob] = deque()
        self.prefills: list[Prefill] = []
        self.lanes: list[LiveBatch] = []  # one running batch; with batch_invariant, one per row
        self.cancelled = 0  # rows stopped because their client went away
        self._turn = 0

    def busy(self) -> bool:
        return bool(self.waiting or self.prefills or self.lanes)

    def add(self, jobs: list[GenerationJob]) -> None:
        for job in jobs:
            job.text = TextStream(self.runtime.tokenizer, job.stops)
            self.waiting.append(job)

    def iterate(self) -> None:
        with self.runtime._lock:
            self._admit()
            self._prefill()
            for lane in list(self.lanes):
                self._decode(lane)
            self.lanes = [lane for lane in self.lanes if lane.rows]

    # ------------------------------------------------------------ admission

    def _rows(self) -> list[LiveRow]:
        return [r for p in self.prefills for r in p.rows] + [r for lane in self.lanes for r in lane.rows]

    def _fits(self, rows: list[LiveRow], need: int) -> bool:
        """Whether one more row reserving `need` positions keeps the cache within the budget."""
        if not rows:
            return True
        if self.invariant:  # every row its own cache
            return sum(r.reserved for r in rows) + need <= self.kv_budget
        return (len(rows) + 1) * max(need, *(r.reserved for r in rows)) <= self.kv_budget

    def _admit(self) -> None:
        adapters = self.runtime.adapters
        if adapters.refresh_pending and not adapters.refresh_pending & set(adapters.in_use):
            adapters.sync_with_registry()  # the rows of a changed adapter have left: load what the name means now
        rows = self._rows()
        admitted: list[LiveRow] = []
        while self.waiting and len(rows) < self.max_rows:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                self._stop_cancelled(job)
                continue
            if not self._fits(rows, len(job.prompt) + job.sampling.max_new_tokens):
                break  # admission waits for rows to leave rather than over-allocating
            if adapters.refresh_pending and _key(adapters, job.adapter) in adapters.refresh_pending:
                break  # its adapter changed in the registry: it waits for the new version
            try:
                row = self._row_for(job)
            except NoRoom as exc:  # every adapter slot serves a running row: wait for one to leave
                if rows:
                    break
                self._fail([job], exc, "no room for the adapter")
                self.waiting.popleft()
                continue
            except Exception as exc:
                self.waiting.popleft()
                self._fail([job], exc, "admitting a generation failed")
                continue
            if row is None:  # served whole (a grouped adapter), already answered
                self.waiting.popleft()
                continue
            self.waiting.popleft()
            rows.append(row)
            admitted.append(row)
        self._group(admitted)

    def _row_for(self, job: GenerationJob) -> LiveRow | None:
        runtime, sampling = self.runtime, job.sampling
        need = len(job.prompt) + sampling.max_new_tokens
        if need > runtime.max_positions:
            raise UserInputError(f"a prompt of {len(job.prompt)} tokens plus {sampling.max_new_tokens} new tokens "
                                 f"exceeds the {runtime.max_positions} positions this base takes; shorten the prompt "
                                 f"or max_tokens")
        if need > self.kv_budget:
            raise UserInputError(f"a prompt of {len(job.prompt)} tokens plus {sampling.max_new_tokens} new tokens "
                                 f"needs {need} cache positions; this server holds at most {self.kv_budget} "
                                 f"(--kv-budget): shorten the prompt or max_tokens")
        adapters = runtime.adapters
        name = adapters.key(job.adapter)
        adapter = None if name is None else adapters.use(name, keep=set(adapters.in_use))
        if adapter is not None and adapter.group_model is not None:
            self._serve_whole(job, name)
            return None
        if name is not None:
            adapters.in_use[name] += 1
        return LiveRow(job, list(job.prompt), adapter, sampling, generators_for([sampling])[0])

    def _group(self, rows: list[LiveRow]) -> None:
        """Prefill groups: each row alone when batch-invariant; otherwise the short prompts together, each long one
        alone (it is read over several iterations)."""
        if self.invariant:
            self.prefills += [Prefill(self.runtime, [r]) for r in rows]
            return
        short = [r for r in rows if len(r.prompt) <= self.prefill_chunk]
        if short:
            self.prefills.append(Prefill(self.runtime, short))
        self.prefills += [Prefill(self.runtime, [r]) for r in rows if len(r.prompt) > self.prefill_chunk]

    # ------------------------------------------------------------ prefill and decode

    def _prefill(self) -> None:
        """One chunk of one prefill: by turns the one nearest its end and the oldest, so short prompts are read at
        once and a long one still advances."""
        for prefill in [p for p in self.prefills if all(r.job.cancelled for r in p.rows)]:
            self.prefills.remove(prefill)
            for row in prefill.rows:
                self._stop_cancelled(row.job)
            self._release(*prefill.rows)
        if not self.prefills:
            return
        self._turn += 1
        prefill = min(self.prefills, key=lambda p: p.remaining) if self._turn % 2 else self.prefills[0]
        try:
            fault_point("generation")
            done = prefill.step(None if self.invariant else self.prefill_chunk)
        except Exception as exc:
            self.prefills.remove(prefill)
            self._fail([r.job for r in prefill.rows], exc, "reading a prompt failed")
            self._release(*prefill.rows)
            return
        if done:
            self.prefills.remove(prefill)
            lane = LiveBatch(self.runtime) if self.invariant or not self.lanes else self.lanes[0]
            lane.join(prefill)
            if lane not in self.lanes:
                self.lanes.append(lane)
            if self.on_join:
                self.on_join(len(lane))

    def _decode(self, lane: LiveBatch) -> None:
        gone = [i for i, r in enumerate(lane.rows) if r.job.cancelled]
        if gone:
            for i in gone:
                self._stop_cancelled(lane.rows[i].job)
            self._release(*[lane.rows[i] for i in gone])
            lane.keep([i for i in range(len(lane.rows)) if i not in set(gone)])
        if not lane.rows:
            return
        try:
            delay_point("decode_step")
            tokens = lane.choose()
            eos = self.runtime.tokenizer.eos_token_id
            ended = [i for i, (row, token) in enumerate(zip(lane.rows, tokens)) if advance(row.job, token, eos)]
            self._release(*[lane.rows[i] for i in ended])
            kept = [i for i in range(len(lane.rows)) if i not in set(ended)]
            lane.keep(kept)
            if kept:
                lane.step([tokens[i] for i in kept])
        except Exception as exc:  # every row of the batch hears of it; the worker keeps serving
            self._fail([r.job for r in lane.rows], exc, "a generation step failed")
            self._release(*lane.rows)
            lane.keep([])

    def _serve_whole(self, job: GenerationJob, name: str) -> None:
        """An adapter that runs as a group (prefix tuning): its request is generated whole, now."""
        eos = self.runtime.tokenizer.eos_token_id
        try:
            for step in self.runtime.generate_stream([job.prompt], [name], [job.sampling]):
                if job.cancelled:
                    self._stop_cancelled(job)
                    return
                if advance(job, step[0], eos):
                    return
            finish(job, "length")
        except Exception as exc:
            self._fail([job], exc, "a generation failed")

    # ------------------------------------------------------------ rows leaving

    def _stop_cancelled(self, job: GenerationJob) -> None:
        """A job whose client went away: counted, and told it is done."""
        self.cancelled += 1
        finish(job, "stop")

    def _release(self, *rows: LiveRow) -> None:
        for row in rows:
            if row.adapter is not None:
                in_use = self.runtime.adapters.in_use
                in_use[row.adapter.name] -= 1
                if in_use[row.adapter.name] <= 0:
                    del in_use[row.adapter.name]

    def _fail(self, jobs: list[GenerationJob], exc: Exception, what: str) -> None:
        log_unexpected(exc, what)
        for job in jobs:
            job.emit("error", exc)

    def fail_all(self, exc: Exception) -> None:
        """Everything waiting or running hears of `exc` (the worker could not go on with them)."""
        self._fail(list(self.waiting), exc, "generation stopped")
        self.waiting.clear()
        rows = self._rows()
        self._fail([r.job for r in rows], exc, "generation stopped")
        self._release(*rows)
        self.prefills, self.lanes = [], []


def _key(adapters, name):
    try:
        return adapters.key(name)
    except UserInputError:  # a bad name is reported when the job is admitted
        return None
