"""Ray Train dataset config for streamed shards (imported by the training glue when it builds a trainer)."""

from __future__ import annotations

from ray.train import DataConfig


class ShardData(DataConfig):
    """Streaming-splits ``equal`` datasets into shards of equal row counts (training splits: every
    rank takes the same number of batches per epoch, so ranks stay in step) and ``unequal`` ones
    into shards that drop no row (evaluation splits). Ray Train's own ``DataConfig`` splits every
    dataset it splits with ``equal=True``, which would drop up to ``world - 1`` evaluation rows."""

    def __init__(self, equal: list[str], unequal: list[str]):
        # both lists are "split" for Ray Train (Train V2 then calls configure once per dataset,
        # with every worker waiting for its shard); configure decides how
        super().__init__(datasets_to_split=list(equal) + list(unequal))
        self.unequal = set(unequal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k not in self.unequal}
        out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name in self.unequal.intersection(datasets):
            ds = datasets[name]
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                out[i][name] = split
        return out
