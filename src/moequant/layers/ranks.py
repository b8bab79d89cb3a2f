"""Streaming under torch.distributed (``torchrun``; gloo on CPU, NCCL on GPUs), byte-identical to one process.

Every rank streams every decoder layer. Per layer:
  * weight search: the layer's targets are cut into units (a weight group such as q/k/v, which must share one
    global scale; a single linear; a range of an experts projection's experts, ``Ranks.units``), balanced over
    the ranks by size, searched with the same function a single process uses (every per-expert quantity is
    computed per expert, so ranges concatenated equal the whole), and rank 0 gathers the results
    (``gather_object``): the ranks exchange data, they share no object;
  * calibration: the calibration batches are dealt out (rank ``r`` runs batches ``r, r + world, ...``, the very
    batches of one process, so every forward is the same computation); after the layer's forward the
    observations are all-reduced, before any decision is taken on them: activation, KV and per-expert amax with
    MAX, routed-token counts and token totals with SUM; the targeted coverage pass of under-covered experts then
    runs on each rank's tokens and its amax is reduced with MAX again.
A max and an integer sum are exact whatever the order, so the scales equal one process's, bit for bit. Rank 0
alone journals, exports and writes. ``weighted_mse``'s channel statistics are float64 sums, whose value depends
on the order of the additions: each rank keeps every forward call's sum apart, the ranks exchange them
(``all_gather_object``; gptq's X^T X sums by one broadcast per call, ``_fold_channel_sums``) and every rank adds
them in one process's batch order, so the sums are bit-identical too (memory: the layer's per-batch sums of this
rank, [E, H] + [E, I] float64 per experts container and batch, and with gptq [E, H, H] + [E, I, I]).
"""

from __future__ import annotations

import io
import math
import os

import torch
import torch.distributed as dist

from moequant.calibrate import CalibrationError


class Ranks:
    """This process's place in the default process group, and the collectives the streamed run needs."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @classmethod
    def current(cls) -> Ranks | None:
        """The default group when torch.distributed is initialized with more than one process, else None."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls()
        return None

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def my_batches(self, batches: list) -> list:
        if batches and len(batches) < self.world:
            raise CalibrationError(f"{len(batches)} calibration batches for {self.world} processes: every process "
                                   "needs one; use more samples or fewer processes")
        self.batches = len(batches)
        return batches[self.rank::self.world]

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ weight search

    def units(self, targets: list) -> list[list]:
        """The layer's weight work cut into units: a weight group (one global scale: searched together), a
        single linear, or a range of a fused-experts target's experts (each target cut into ``world`` ranges, so
        that every rank has work even on a layer of two experts projections). Each rank takes the units a
        greedy balance by element count gives it (largest first, to the least loaded rank, lowest rank on
        ties): the same assignment on every rank."""
        cut, by_group = [], {}
        for t in targets:
            if t.group is not None:
                if t.group not in by_group:
                    by_group[t.group] = []
                    cut.append(by_group[t.group])
                by_group[t.group].append(t)
            elif t.kind == "experts" and t.shape[0] > 1:
                n = t.shape[0]
                bounds = sorted({n * j // self.world for j in range(self.world)} | {n})
                cut += [[t.expert_range(lo, hi)] for lo, hi in zip(bounds, bounds[1:])]
            else:
                cut.append([t])
        return cut

    def my_units(self, targets: list) -> list[list]:
        units = self.units(targets)
        size = [sum(math.prod(t.shape) for t in u) for u in units]
        load, mine = [0] * self.world, []
        for u in sorted(range(len(units)), key=lambda u: (-size[u], u)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            load[rank] += size[u]
            if rank == self.rank:
                mine.append(units[u])
        return mine

    def gather_pieces(self, pieces: list, backends: set) -> tuple[list, set]:
        """Rank 0 receives every rank's (expert offset, TensorScales) pieces and backends; the other ranks get
        nothing back (they write nothing)."""
        buf = io.BytesIO()   # torch.save, not pickle: the object collectives' unpickler rejects float8 tensors
        torch.save((pieces, sorted(backends)), buf)
        gathered = [None] * self.world if self.writer else None
        dist.gather_object(buf.getvalue(), gathered, dst=0)
        if not self.writer:
            return [], set()
        everything, used = [], set()
        for blob in gathered:
            got, names = torch.load(io.BytesIO(blob), weights_only=False)
            everything += got
            used.update(names)
        return everything, used

    # ------------------------------------------------------------------ observations

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        x = t.detach().reshape(-1).to(self.device).clone()
        dist.all_reduce(x, op=op)
        return x.to(t.device).reshape(t.shape)

    def reduce_observations(self, stats, prefix: str) -> None:
        """MAX of activation / KV / expert amax, SUM of routed-token counts, for the modules under ``prefix``
        (in ``stats``: the layer step's own statistics)."""
        mx, sm = dist.ReduceOp.MAX, dist.ReduceOp.SUM
        for key in sorted(k for k in stats.linear_amax if k.startswith(prefix)):
            stats.linear_amax[key] = self._reduce(stats.linear_amax[key], mx)
        for path in sorted(p for p in stats.experts if p.startswith(prefix)):
            obs = stats.experts[path]
            obs.tokens = self._reduce(obs.tokens, sm)
            obs.gate_up_amax = self._reduce(obs.gate_up_amax, mx)
            obs.down_amax = self._reduce(obs.down_amax, mx)
            obs.hidden_amax = self._reduce(obs.hidden_amax, mx)
            obs.total_tokens = int(self._reduce(torch.tensor(obs.total_tokens, dtype=torch.int64), sm))
        for path in sorted(p for p in stats.kv_amax if p.startswith(prefix)):
            stats.kv_amax[path] = [self._reduce(a, mx) for a in stats.kv_amax[path]]
        if stats.channels is not None:
            self._fold_channel_sums(stats.channels, prefix)

    def _fold_channel_sums(self, channels, prefix: str) -> None:
        """Every rank's per-call channel sums, added in one process's order (batch b ran on rank b % world as
        that rank's call b // world; each batch makes the same number of calls to a module). The [K] / [E, K]
        sums travel in one all_gather; gptq's X^T X sums ([K, K] / [E, K, K]) are broadcast one call at a time
        by the rank that made it, in batch order, and every rank adds each as it arrives: a rank holds its own
        calls' sums, the running total and one received sum, never every batch's."""
        entries = channels.under(prefix)
        big = [kind.endswith("_h") for kind, _, _ in entries]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, [(kind, key, len(sums.parts) if b else sums.parts, sums.count)
                                          for (kind, key, sums), b in zip(entries, big)])
        for i, (kind, key, sums) in enumerate(entries):
            if any(g[i][:2] != (kind, key) for g in gathered):
                raise CalibrationError(f"{key}: the ranks observed different modules; cannot combine their statistics")
            lengths = [g[i][2] if big[i] else len(g[i][2]) for g in gathered]
            calls, rem = divmod(sum(lengths), self.batches)
            if rem or any(n != calls * len(range(r, self.batches, self.world)) for r, n in enumerate(lengths)):
                raise CalibrationError(f"{key}: {lengths} observed calls on the ranks for "
                                       f"{self.batches} batches; cannot restore one process's order")
            count = sum((g[i][3] for g in gathered), torch.zeros_like(sums.count))
            order = [(b % self.world, (b // self.world) * calls + c) for b in range(self.batches) for c in range(calls)]
            if not big[i]:
                sums.fold([gathered[r][i][2][j] for r, j in order], count)
                continue
            sums.fold(self._broadcast_parts(sums, order), count)

    def _broadcast_parts(self, sums, order: list[tuple[int, int]]):
        """Each call's sum in ``order`` ((rank, its call)), broadcast by the rank that made it when it is needed;
        a rank drops its own sum once sent."""
        for r, j in order:
            part = sums.parts[j] if r == self.rank else None
            t = part.to(self.device) if part is not None else \
                torch.empty(sums.sq.shape, dtype=torch.float64, device=self.device)
            dist.broadcast(t, src=r)
            if part is not None:
                sums.parts[j] = None
            yield t

    def reduce_expert_amax(self, expert_amax: dict) -> dict:
        """MAX of the per-expert input amax after the coverage pass (which ran on each rank's own tokens)."""
        mx = dist.ReduceOp.MAX
        return {path: (self._reduce(expert_amax[path][0], mx), self._reduce(expert_amax[path][1], mx))
                for path in sorted(expert_amax)}

    def reduce_smoothing(self, amax: dict, tokens: dict) -> None:
        """Smoothing's statistics (``moequant.smoothing``), in place: MAX of channel amax, SUM of routed tokens."""
        for key in sorted(amax):
            amax[key] = self._reduce(amax[key], dist.ReduceOp.MAX)
        for key in sorted(tokens):
            tokens[key] = self._reduce(tokens[key], dist.ReduceOp.SUM)


class ProcessGroupFromEnv:
    """Under ``torchrun`` (WORLD_SIZE > 1): joins the process group (NCCL for CUDA, else gloo); ``device`` is
    this rank's (``cuda:<LOCAL_RANK>``), or the one given, unchanged, outside torchrun or when the caller has
    already joined a group (then ``leave`` leaves it alone). A group joined here must be left here: one left
    for interpreter exit can abort the process there (gloo's worker threads still holding work; see
    pytorch/pytorch PR 179291)."""

    def __init__(self, device: str):
        self.device, self.joined = device, False
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
            return
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
            self.device = f"cuda:{local}"
        else:
            dist.init_process_group("gloo")
        self.joined = True

    def leave(self, barrier: bool) -> None:
        """Destroy the group joined here (once); ``barrier``: first wait until every rank got here (when the
        work ran through: no rank tears down while another still communicates; never after an error, where
        the other ranks may never arrive)."""
        if not self.joined:
            return
        self.joined = False
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()
