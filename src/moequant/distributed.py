"""Streaming under torch.distributed (``torchrun``; gloo on CPU, NCCL on GPUs), byte-identical to one process.

Every rank streams every decoder layer. Per layer:
  * weight search: the layer's targets are cut into units (a weight group such as q/k/v, which must share one
    global scale, or a single target: an experts container's ``gate_up_proj`` / ``down_proj``), unit ``u`` is
    searched by rank ``u % world`` with the same function a single process uses, and rank 0 gathers the
    scales (``gather_object``);
  * calibration: the calibration batches are dealt out (rank ``r`` runs batches ``r, r + world, ...``, the very
    batches of one process, so every forward is the same computation); after the layer's forward the
    observations are all-reduced, before any decision is taken on them: activation, KV and per-expert amax with
    MAX, routed-token counts and token totals with SUM; the targeted coverage pass of under-covered experts then
    runs on each rank's tokens and its amax is reduced with MAX again.
A max and an integer sum are exact whatever the order, so the scales equal one process's, bit for bit. Rank 0
alone journals, exports and writes. ``weighted_mse``'s channel statistics are float64 sums, whose value depends
on the order of the additions: each rank keeps every forward call's sum apart, the ranks exchange them
(``all_gather_object``) and every rank adds them in one process's batch order, so the sums are bit-identical
too (memory: the layer's per-batch sums, [E, H] + [E, I] float64 per experts container and batch).
"""

from __future__ import annotations

import io
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

    @staticmethod
    def _units(targets: list) -> list[list]:
        units, by_group = [], {}
        for t in targets:
            if t.group is None:
                units.append([t])
            elif t.group in by_group:
                by_group[t.group].append(t)
            else:
                by_group[t.group] = [t]
                units.append(by_group[t.group])
        return units

    def mine(self, targets: list) -> list:
        return [t for u, unit in enumerate(self._units(targets)) if u % self.world == self.rank for t in unit]

    def gather_scales(self, run, targets: list) -> None:
        """Rank 0 receives every rank's scales of ``targets`` (into ``run.tensors``) and backends."""
        buf = io.BytesIO()   # torch.save, not pickle: the object collectives' unpickler rejects float8 tensors
        torch.save(({t.key: run.tensors[t.key] for t in self.mine(targets)}, sorted(run.backends)), buf)
        gathered = [None] * self.world if self.writer else None
        dist.gather_object(buf.getvalue(), gathered, dst=0)
        if self.writer:
            for blob in gathered:
                tensors, backends = torch.load(io.BytesIO(blob), weights_only=False)
                run.tensors.update(tensors)
                run.backends.update(backends)

    # ------------------------------------------------------------------ observations

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        x = t.detach().reshape(-1).to(self.device).clone()
        dist.all_reduce(x, op=op)
        return x.to(t.device).reshape(t.shape)

    def reduce_observations(self, run, prefix: str) -> None:
        """MAX of activation / KV / expert amax, SUM of routed-token counts, for the modules under ``prefix``."""
        stats, mx, sm = run.stats, dist.ReduceOp.MAX, dist.ReduceOp.SUM
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
        that rank's call b // world; each batch makes the same number of calls to a module)."""
        entries = channels.under(prefix)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, [(kind, key, sums.parts, sums.count) for kind, key, sums in entries])
        for i, (kind, key, sums) in enumerate(entries):
            per_rank = [g[i][2] for g in gathered]
            if any(g[i][:2] != (kind, key) for g in gathered):
                raise CalibrationError(f"{key}: the ranks observed different modules; cannot combine their statistics")
            calls, rem = divmod(sum(len(p) for p in per_rank), self.batches)
            if rem or any(len(p) != calls * len(range(r, self.batches, self.world)) for r, p in enumerate(per_rank)):
                raise CalibrationError(f"{key}: {[len(p) for p in per_rank]} observed calls on the ranks for "
                                       f"{self.batches} batches; cannot restore one process's order")
            ordered = [p for b in range(self.batches)
                       for p in per_rank[b % self.world][(b // self.world) * calls:(b // self.world + 1) * calls]]
            sums.fold(ordered, sum((g[i][3] for g in gathered), torch.zeros_like(sums.count)))

    def reduce_expert_amax(self, run, prefix: str) -> None:
        """MAX of the per-expert input amax after the coverage pass (which ran on each rank's own tokens)."""
        for path in sorted(p for p in run.expert_amax if p.startswith(prefix)):
            gate_up, down = run.expert_amax[path]
            run.expert_amax[path] = (self._reduce(gate_up, dist.ReduceOp.MAX), self._reduce(down, dist.ReduceOp.MAX))


def init_from_env(device: str) -> str:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL for CUDA, else gloo) and return this
    rank's device (``cuda:<LOCAL_RANK>``); otherwise return ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device
