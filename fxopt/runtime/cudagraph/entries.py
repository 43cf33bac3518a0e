"""The per-signature records of a runner: :class:`GraphEntry` (the report's snapshot) and ``_Entry`` (the live
record: its graphs, static buffers, copy nodes and counters)."""

from __future__ import annotations

from dataclasses import dataclass


# -- entries --------------------------------------------------------------------------------------------------------
@dataclass
class GraphEntry:
    """One signature as :meth:`CUDAGraphRunner.entries` reports it (a snapshot)."""

    signature: str  # human-readable: "float32[8, 1024]@cuda:0 (bucket 8)"
    status: str  # "captured" | "eager" | "evicted"
    captured: bool
    reason: str | None  # why it runs eagerly / was evicted
    bucket: int | None
    graphs: int  # graphs held (rotate_depth in "rotate" mode, else 1)
    num_nodes: int | None  # nodes of one graph
    pool_bytes: int | None  # device memory the shared pool gained during this signature's capture
    output_bytes: int  # live output buffers of its graphs (inside the pool)
    replays: int
    eager_calls: int
    capture_seconds: float
    note: str | None = None
    key: tuple = ()
    replay: str = ""  # "native", or "Python: why" (NOTE [Native graph call]); "" when not captured
    programmatic_edges: int = 0  # edges into generated kernels made programmatic (runtime/cudagraph/pdl.py)


class Entry:
    __slots__ = ("key", "description", "device", "bucket", "status", "reason", "note", "graphs", "replayers",
                 "static_inputs", "out_leaves", "spec", "batched", "alias_input", "num_nodes", "pool_bytes",
                 "output_bytes", "replays", "eager_calls", "capture_seconds", "last_used", "cursor", "fast_keys",
                 "io_inputs", "io_outputs", "uses_rng", "native_calls", "python_replay", "pools",
                 "programmatic_edges")

    def __init__(self, key: tuple, description: str, device: int | None, bucket: int | None):
        self.key = key
        self.description = description
        self.device = device
        self.bucket = bucket
        self.status = "pending"
        self.reason: str | None = None
        self.note: str | None = None
        self.graphs: list = []
        self.replayers: list = []
        self.static_inputs: list = []  # (argument position, static tensor)
        self.out_leaves: list[list] = []  # per graph: flat outputs
        self.spec = None
        self.batched: list[bool] = []
        self.alias_input: list[bool] = []
        self.num_nodes: int | None = None
        self.pool_bytes: int | None = None
        self.output_bytes = 0
        self.replays = 0
        self.eager_calls = 0
        self.capture_seconds = 0.0
        self.last_used = 0
        self.cursor = 0
        self.fast_keys: list = []
        self.io_inputs: list = []  # (argument position, graph_io.CopyNode into its static buffer)
        self.io_outputs: list = []  # per output leaf: graph_io.CopyNode out of it (empty: outputs cloned instead)
        self.uses_rng = True  # whether a replay advances the CUDA generator (then only torch's replay() will do)
        self.native_calls: list = []  # weak references to its native graph calls (NOTE [Native graph call])
        self.python_replay: str | None = None  # why its last call path replays from Python, when it does
        self.pools: list = []  # pools of its own graphs (NOTE [Pools and held outputs]); empty: the runner's pool
        self.programmatic_edges = 0

    def drop_buffers(self) -> None:
        self.forget_native_calls()
        self.graphs, self.replayers, self.static_inputs, self.out_leaves = [], [], [], []
        self.io_inputs, self.io_outputs, self.pools = [], [], []

    def forget_native_calls(self) -> None:
        """Drop the native graph calls (their closures are gone), keeping the count of their replays."""
        self.replays += self.native_replays()
        self.native_calls = []

    def native_replays(self) -> int:
        """Replays launched by the native graph calls (the Python closures count theirs in ``replays``)."""
        from .. import native

        mod = native.module()
        calls = [ref() for ref in self.native_calls]
        return sum(mod.graph_launches(c) for c in calls if c is not None) if mod else 0

    def snapshot(self) -> GraphEntry:
        return GraphEntry(signature=self.description, status=self.status, captured=self.status == "captured",
                          reason=self.reason, bucket=self.bucket, graphs=len(self.graphs), num_nodes=self.num_nodes,
                          pool_bytes=self.pool_bytes, output_bytes=self.output_bytes,
                          replays=self.replays + self.native_replays(),
                          eager_calls=self.eager_calls, capture_seconds=self.capture_seconds, note=self.note,
                          key=self.key, replay=self.replay_path(), programmatic_edges=self.programmatic_edges)

    def replay_path(self) -> str:
        """How calls replay its graph: from C++ (native) or through the Python closure, and why."""
        if self.status != "captured":
            return ""
        if any(ref() is not None for ref in self.native_calls):
            return "native"
        if self.python_replay is not None:
            return f"Python: {self.python_replay}"
        from .. import native

        return f"Python until the native extension is loaded ({native.status()})"
