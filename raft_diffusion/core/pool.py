"""A streaming selection pool: memory holds only what the stage may still keep.

Samples arrive in batches; each is recorded (prompt index, seed, reward, ...), and its payload is
held only while it is among the best seen so far for its slot (its prompt in ``local`` mode, the
whole stage in ``global`` mode). Selections equal :func:`ranking.select` on the same samples.
With ``ranking.diversity_weight`` > 0 a prompt's pick depends on all of its samples, so every scored
sample's payload is held until :meth:`StreamingPool.kept`. A threshold that rises with the pool
(``ranking.threshold_quantile``) is known only once the stage is complete: the pool holds what reaches
``ranking.threshold`` and cuts at the stage's quantile in :meth:`StreamingPool.kept`. With
``ranking.negative_k`` m > 0 (``local`` mode) the pool also holds, per prompt, the payloads of its ``m + top_k``
(+ ``skip_top``) lowest-keyed samples, of which :meth:`StreamingPool.negatives` returns the ``m`` worst not kept and
not skipped. With ``ranking.skip_top`` n a prompt's heap holds ``top_k + n`` candidates and :meth:`StreamingPool.kept`
leaves out its best ``n`` (fewer when the prompt has under ``top_k + n`` valid samples: :func:`~.ranking.skip_count`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from .common import summary
from .ranking import check_diverse, diverse_pick, global_count, is_nan, order_key, sample_key, skip_count, stage_threshold, uses_embeddings
from .types import Sample


class StreamingPool:
    """Keeps the top samples of a stage while the rest stream past.

    ``expected_total`` (the number of samples the stage will generate) is needed by ``global`` mode
    to turn ``top_ratio`` into a count before the samples arrive.
    """

    def __init__(self, ranking, expected_total: int):
        self.ranking = ranking
        self.expected_total = expected_total
        self.records: list[Sample] = []  # every sample, payload dropped once it cannot be kept
        self._heaps: dict[object, list] = {}
        # greedy spread-out / novelty pick per prompt: needs every candidate of the prompt
        self.spread = uses_embeddings(ranking)
        # threshold rising with the pool: the cut needs every key of the stage (see kept())
        self.deferred = ranking.mode == "threshold" and getattr(ranking, "threshold_quantile", None) is not None
        self.cut: float | None = None  # the threshold kept() applied (threshold mode)
        # ranking.skip_top: each prompt's best n valid samples are left out of the pick (counted per prompt)
        self.skip_top = int(getattr(ranking, "skip_top", 0) or 0)
        self._valid: dict[int, int] = {}
        self._capacity = self._slot_capacity()
        self._held = 0  # payloads currently in the heaps
        self.max_payloads_held = 0
        # ranking.negative_k: per prompt the m + top_k worst samples, each with its payload (the worst m not kept
        # are among them); items ((-key, -sample index), sample, payload), the best of them on top of the heap
        self.negative_k = int(getattr(ranking, "negative_k", 0) or 0)
        self._bottom: dict[int, list] = {}

    def _slot_capacity(self) -> int | None:
        r = self.ranking
        if self.spread:
            check_diverse(r.mode, True)
            return None  # the greedy spread pick needs every candidate of the prompt
        if r.mode == "local":
            return r.top_k + self.skip_top
        if r.mode == "global":
            cap = global_count(self.expected_total, r.top_ratio)
            return cap if r.max_kept is None else min(cap, r.max_kept)
        return r.max_kept  # threshold: unbounded unless capped

    def _slot(self, sample: Sample) -> object:
        return sample.prompt_index if self.ranking.mode == "local" else "all"

    def add(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            self.records.append(s)
            key = sample_key(s, self.ranking.kl_beta)
            if self.negative_k and not is_nan(key):
                self._add_bottom(s, key)
            if self.skip_top and not is_nan(key):
                self._valid[s.prompt_index] = self._valid.get(s.prompt_index, 0) + 1
            if is_nan(key) or (self.ranking.mode == "threshold" and key < self.ranking.threshold):
                s.payload = None
                continue
            if self.spread and s.embedding is None:
                check_diverse(self.ranking.mode, False)
            heap = self._heaps.setdefault(self._slot(s), [])
            item = (order_key(key, s.prompt_index, s.sample_index), s)
            if self._capacity is None or len(heap) < self._capacity:
                heapq.heappush(heap, item)
                self._held += s.payload is not None
            elif item[0] > heap[0][0]:
                self._held += (s.payload is not None) - (heap[0][1].payload is not None)
                heapq.heapreplace(heap, item)[1].payload = None
            else:
                s.payload = None
            self.max_payloads_held = max(self.max_payloads_held, self._held)

    def _add_bottom(self, s: Sample, key: float) -> None:
        heap = self._bottom.setdefault(s.prompt_index, [])
        item = ((-key, -s.sample_index), s, s.payload)
        if len(heap) < self.negative_k + self.ranking.top_k + self.skip_top:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)

    def restore_negative_payloads(self) -> None:
        """Put the held payloads back on the negative candidates (before the records are sent to another process)."""
        for heap in self._bottom.values():
            for _, s, payload in heap:
                s.payload = payload

    def negatives(self) -> list[Sample]:
        """``ranking.negative_k``: per prompt (in increasing order) its ``m`` lowest-keyed samples that
        :meth:`kept` did not keep, worst first, with their payloads; marks ``negative`` in their extras. Call
        after :meth:`kept`. Equals :func:`~.ranking.select_negatives` on the same samples. Each negative's extras, and
        each kept sample's, also get ``pool_mean`` and ``pool_sd``: the mean and (population) standard deviation of the
        rewards of its prompt's scored, not discarded samples (``train.negative_advantage_scale``,
        ``train.advantage_weights``), and, where the pick raised the keys, ``pool_selection_mean`` and
        ``pool_selection_sd``: the same of their selection keys (:meth:`selection_stats`)."""
        stats = self.prompt_stats()
        out = []
        for p in sorted(self._bottom):
            items = sorted(self._bottom[p], key=lambda it: it[0], reverse=True)  # worst first
            chosen = [(s, payload) for _, s, payload in items if not (s.extras.get("kept") or s.extras.get("skipped"))][: self.negative_k]
            for s, payload in chosen:
                s.payload = payload
                s.extras["negative"] = True
                out.append(s)
        sel = self.selection_stats()
        for s in out + [s for s in self.records if s.extras.get("kept")]:
            s.extras["pool_mean"], s.extras["pool_sd"] = stats[s.prompt_index]
            if s.prompt_index in sel:
                s.extras["pool_selection_mean"], s.extras["pool_selection_sd"] = sel[s.prompt_index]
        return out

    def prompt_stats(self) -> dict[int, tuple[float, float]]:
        """Per prompt: the mean and population standard deviation of its scored, not discarded samples' rewards."""
        return self._stats_by_prompt(lambda s: s.reward)

    def selection_stats(self) -> dict[int, tuple[float, float]]:
        """Per prompt whose pick raised the keys (``ranking.novelty_weight``): the mean and population standard
        deviation of its scored samples' ``selection_key`` (``train.reward_weight_key: selection`` with
        ``train.advantage_weights``). Empty before :meth:`kept`, and for picks without a novelty term."""
        return self._stats_by_prompt(lambda s: s.selection_key)

    def _stats_by_prompt(self, value) -> dict[int, tuple[float, float]]:
        """Per prompt: (mean, population std) of ``value(sample)`` over its scored, not discarded samples that have one."""
        groups: dict[int, list[float]] = {}
        for s in self.records:
            v = value(s)
            if v is not None and not is_nan(sample_key(s, self.ranking.kl_beta)):
                groups.setdefault(s.prompt_index, []).append(float(v))
        stats = {p: summary(vs) for p, vs in groups.items()}
        return {p: (st["mean"], st["std"]) for p, st in stats.items()}

    def num_payloads_held(self) -> int:
        return self._held

    def _spread_heaps(self) -> None:
        """Cut each prompt's candidates down to its greedy spread-out ``top_k`` (drops the others' payloads)."""
        for slot, heap in self._heaps.items():
            items = sorted(heap, key=lambda it: it[0], reverse=True)
            gains: list[float] = []
            skip = self._mark_skipped(items, len(items))
            picks = set(
                diverse_pick(
                    [it[0][0] for it in items],
                    [it[1].embedding for it in items],
                    self.ranking.top_k,
                    self.ranking.diversity_weight,
                    getattr(self.ranking, "novelty_weight", 0.0),
                    gains,
                    skip=skip,
                )
            )
            for (_, s), g in zip(items, gains):
                s.selection_key = g  # the key raised by the novelty term (train.reward_weight_key: selection)
            for j, (_, s) in enumerate(items):
                if j not in picks:
                    self._held -= s.payload is not None
                    s.payload = None
            self._heaps[slot] = [it for j, it in enumerate(items) if j in picks]

    def _mark_skipped(self, items: list, n_valid: int) -> int:
        """``ranking.skip_top``: mark the first of a prompt's candidates ``items`` (best first) that the pick leaves out
        (``skipped`` in their extras) and return how many; the prompt has ``n_valid`` valid samples in all."""
        skip = skip_count(n_valid, self.ranking.top_k, self.skip_top)
        for _, s in items[:skip]:
            s.extras["skipped"] = True
        return skip

    def _skip_heaps(self) -> None:
        """``ranking.skip_top`` with a plain local pick: each prompt's heap (its best ``top_k + skip_top``) loses its best
        :func:`~.ranking.skip_count`, payloads dropped."""
        for p, heap in self._heaps.items():
            items = sorted(heap, key=lambda it: it[0], reverse=True)
            skip = self._mark_skipped(items, self._valid.get(p, 0))
            for _, s in items[:skip]:
                self._held -= s.payload is not None
                s.payload = None
            self._heaps[p] = items[skip:]

    def kept(self) -> list[Sample]:
        """The selection, best first; also marks ``kept`` in every record's extras (and ``skipped`` in those
        ``ranking.skip_top`` left out)."""
        if self.spread:
            self._spread_heaps()
        elif self.skip_top:
            self._skip_heaps()
        items = sorted((it for heap in self._heaps.values() for it in heap), key=lambda it: it[0], reverse=True)
        if self.ranking.mode == "threshold":
            r = self.ranking
            keys = [sample_key(s, r.kl_beta) for s in self.records]
            self.cut = stage_threshold(keys, r.threshold, getattr(r, "threshold_quantile", None), getattr(r, "threshold_max", None))
            for _, low in (it for it in items if it[0][0] < self.cut):
                self._held -= low.payload is not None
                low.payload = None
            items = [it for it in items if it[0][0] >= self.cut]  # max_kept's heap held the best of what reaches threshold
        if self.ranking.max_kept is not None:
            for _, dropped in items[self.ranking.max_kept :]:
                self._held -= dropped.payload is not None
                dropped.payload = None
            items = items[: self.ranking.max_kept]
        chosen = [s for _, s in items]
        kept_ids = {id(s) for s in chosen}
        for s in self.records:
            s.extras["kept"] = id(s) in kept_ids
        return chosen
