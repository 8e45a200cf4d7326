r"""``executor="ray"``: one trial per Ray actor, on one machine or across a cluster.

Each worker is a Ray actor that receives the evaluator once (``ray.put`` of the pickled evaluator,
which holds the source model), keeps it for its whole life and so keeps its quantized-layer cache
(:mod:`autoqra.apply` caches per source-model object). Trials are dispatched to idle workers in
index order and yielded as they finish.

Faults: when a worker dies mid-trial (killed, segfault, host lost), it is replaced by a fresh one
and the trial is retried once; a second death records the trial as ``"failed"`` with an error
saying the worker died. An exception raised by the evaluator itself records the trial as
``"failed"`` too (evaluators should not raise; the worker stays). :meth:`RayExecutor.close` kills
the workers and shuts Ray down only if this executor started it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from autoqra.config import WORKER_RESOURCE_KEYS as RESOURCE_KEYS
from autoqra.evaluators.base import EvalResult, Evaluator
from autoqra.executors.base import EXECUTORS, Done, Executor, Item

log = logging.getLogger(__name__)


def require_ray() -> Any:
    """Import Ray or raise an ImportError naming the extra that provides it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("executor='ray' needs Ray, an optional extra of autoqra: "
                          "pip install 'autoqra[ray]' (or pip install ray)") from e
    return ray


def _to_worker_device(evaluator: Evaluator) -> Evaluator:
    """Move a CPU-held model to this worker's GPU when Ray assigned it one (models shipped from a CPU
    driver). A worker without an assigned GPU (``num_gpus=0``) stays on the CPU even where CUDA is
    visible: it must not crowd onto cuda:0 beside the workers Ray gave that GPU to."""
    import ray
    import torch

    model, device = getattr(evaluator, "model", None), getattr(evaluator, "device", None)
    if model is None or not isinstance(device, torch.device) or device.type != "cpu":
        return evaluator
    if not ray.get_gpu_ids() or not torch.cuda.is_available():
        return evaluator
    evaluator.model = model.to("cuda")
    evaluator.device = torch.device("cuda")
    log.info("ray worker %d: moved the evaluator's model to %s", os.getpid(), torch.cuda.get_device_name())
    return evaluator


class _Worker:
    """Body of a Ray actor: holds one evaluator for its life and evaluates trials one at a time."""

    def __init__(self, evaluator: Evaluator | None, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.evaluator = None if evaluator is None else _to_worker_device(evaluator)
        self.info = {"executor": "ray", "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                     "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def load(self, evaluator: Evaluator) -> None:
        self.evaluator = None  # never evaluate with a stale one if this fails
        self.evaluator = _to_worker_device(evaluator)

    def whoami(self) -> dict[str, Any]:
        return dict(self.info)

    def evaluate(self, assignment: Any, fidelity: Any) -> tuple[EvalResult, dict[str, Any]]:
        if self.evaluator is None:
            raise RuntimeError("this worker has no evaluator")
        return self.evaluator.evaluate(assignment, fidelity), dict(self.info)


def _fits(cluster: dict[str, float], res: dict[str, Any]) -> int:
    """How many workers with actor options ``res`` the cluster's total resources hold."""
    need = {"CPU": res.get("num_cpus"), "GPU": res.get("num_gpus"), "memory": res.get("memory"),
            **(res.get("resources") or {})}
    counts = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v]
    return min(counts) if counts else max(1, int(cluster.get("CPU", 1)))


@EXECUTORS.register("ray")
class RayExecutor(Executor):
    """Evaluates trials on Ray actors, one trial per worker at a time.

    Args:
        evaluator: shipped once to every worker (pickled through the object store); ``None`` to
            :meth:`bind` one later (``autoqra.optimize(..., executor=RayExecutor(None, ...))`` does).
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None``
            starts a local Ray (unless Ray is already initialised in this process, which is reused).
        workers: number of workers; default: as many as the cluster's resources hold. More than fit
            are capped (with a warning) since the extra ones could never start.
        resources: Ray actor options per worker (``num_gpus``, ``num_cpus``, ``memory``, ``resources``,
            ``accelerator_type``); default ``{"num_gpus": 1}`` when the cluster has GPUs, else
            ``{"num_cpus": 1}``. Torch in a worker uses ``num_cpus`` threads (1 if unset).
        max_retries: re-runs of a trial whose worker died (1: retried once, then recorded failed).
        init_kwargs: extra ``ray.init`` arguments when this executor starts Ray.

    Raises:
        ImportError: Ray is not installed.
        ValueError: bad resource options, or the cluster cannot hold a single worker.
    """

    def __init__(self, evaluator: Evaluator | None = None, *, address: str | None = None, workers: int | None = None,
                 resources: dict[str, Any] | None = None, max_retries: int = 1,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        bad = sorted(set(resources or {}) - set(RESOURCE_KEYS))
        if bad:
            raise ValueError(f"worker_resources keys {bad} are not allowed; use {list(RESOURCE_KEYS)}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers={workers!r} is not allowed; it must be a positive integer or None")
        ray = require_ray()
        self._ray, self._closed, self.max_retries = ray, False, int(max_retries)
        self.started_ray = False
        if not ray.is_initialized():
            kw = {"address": address} if address else {"include_dashboard": False}
            ray.init(**kw, **(init_kwargs or {}))
            self.started_ray = True
        elif address:
            log.info("Ray is already initialised in this process; using it (ray_address=%r not used)", address)
        self.address = address
        try:
            cluster = ray.cluster_resources()
            res = dict(resources) if resources else ({"num_gpus": 1} if cluster.get("GPU", 0) >= 1 else {"num_cpus": 1})
            fit = _fits(cluster, res)
            if fit < 1:
                raise ValueError(f"the Ray cluster ({dict(cluster)}) cannot hold one worker with "
                                 f"worker_resources={res}; lower them or add nodes")
            n = workers or fit
            if n > fit:
                log.warning("workers=%d but the cluster holds only %d with %s: using %d", n, fit, res, fit)
                n = fit
            self.n_workers, self.resources = n, res
            self._threads = max(1, int(res.get("num_cpus") or 1))
            self.evaluator = evaluator
            self._ref = None if evaluator is None else ray.put(evaluator)
            self._cls = ray.remote(_Worker).options(**res)
            self._actors = [self._spawn() for _ in range(n)]
        except BaseException:
            self.close()
            raise
        log.info("ray executor: %d workers with %s", n, res)

    def bind(self, evaluator: Evaluator) -> None:
        """Ship ``evaluator`` to every worker (the workers' processes, and their imports, stay)."""
        if evaluator is self.evaluator:
            return
        from ray.exceptions import RayActorError

        self.evaluator, self._ref = evaluator, self._ray.put(evaluator)
        for a, ref in [(a, a.load.remote(self._ref)) for a in self._actors]:
            try:
                self._ray.get(ref)  # an evaluator that cannot load on a worker raises here
            except RayActorError:  # a dead worker: its replacement starts with the new evaluator
                self._replace(a)

    def _spawn(self) -> Any:
        return self._cls.remote(self._ref, self._threads)

    def _replace(self, actor: Any) -> Any:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        new = self._spawn()
        self._actors = [new if a is actor else a for a in self._actors]
        return new

    def workers_info(self) -> list[dict[str, Any]]:
        """``whoami`` of every live worker (blocks until all are up)."""
        return self._ray.get([a.whoami.remote() for a in self._actors])

    def submit_batch(self, items: Sequence[Item], may_start: Callable[[int], bool] | None = None) -> Iterator[Done]:
        ray = self._ray
        from ray.exceptions import RayError, RayTaskError

        if self._ref is None:
            raise RuntimeError("this executor has no evaluator yet: call bind(evaluator) first")

        queue: deque[tuple[int, int]] = deque((i, 0) for i in range(len(items)))  # (index, deaths so far)
        idle, running = list(self._actors), {}
        stopped = False
        while queue or running:
            while idle and queue:
                i, deaths = queue[0]
                if deaths == 0 and (stopped or (may_start is not None and not may_start(i))):
                    stopped = True  # nothing new starts; retries of running items still may
                    queue = deque(q for q in queue if q[1] > 0)
                    continue
                queue.popleft()
                actor = idle.pop(0)
                running[actor.evaluate.remote(*items[i])] = (i, deaths, actor)
            if not running:
                break
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i, deaths, actor = running.pop(ref)
            try:
                res, info = ray.get(ref)
            except RayTaskError as e:  # the evaluator raised: the worker is fine
                idle.append(actor)
                cause = e.cause if getattr(e, "cause", None) is not None else e
                log.warning("ray worker raised on item %d: %s", i, cause)
                res, info = EvalResult(status="failed", error=f"{type(cause).__name__}: {cause}"), {"executor": "ray"}
            except RayError as e:  # the worker died (killed, crashed, node lost)
                idle.append(self._replace(actor))
                deaths += 1
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                if deaths <= self.max_retries:
                    log.warning("ray worker died on item %d (%s); retrying on a restarted worker", i, msg)
                    queue.appendleft((i, deaths))
                    continue
                log.warning("ray worker died on item %d again; recording it as failed", i)
                res = EvalResult(status="failed", error=f"worker died {deaths} times evaluating this trial "
                                                        f"({type(e).__name__}: {msg})")
                info = {"executor": "ray"}
            else:
                idle.append(actor)
            yield Done(i, res, {**info, "attempts": deaths + 1})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.n_workers, "resources": self.resources, "address": self.address}

    def close(self) -> None:
        """Kill the workers; shut Ray down if this executor started it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for a in getattr(self, "_actors", []):
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._actors = []
        if self.started_ray and self._ray.is_initialized():
            self._ray.shutdown()
