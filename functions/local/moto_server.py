"""moto's server, as `moto_server` starts it, with one fix kiln's fault suite needs.

moto 5.2.5 undoes a failed TransactWriteItems by putting back a deep copy of every table the
transaction named, taken before it ran. Two things go wrong when other requests run at the same
time (moto's server is threaded):

- a write another request made to those tables while the transaction ran is undone with it
  (a runner's "succeeded" lost because an unrelated submit's transaction failed its condition);
- the table's stream is replaced by the copy's, so every shard iterator handed out before (what a
  stream reader holds) follows a shard that no longer grows, and records of the failed
  transaction's first writes stay visible on it.

DynamoDB does neither. Here the item writes (put, update, delete, transactions) take one lock, so
a transaction and its undo are atomic with respect to the other writes, and an undone
transaction leaves the table with its original stream shard, cut back to where it was.

The copy also took the whole stream history every transaction, so moto's memory grew with the
square of the jobs table's history (3 GB after 600 jobs' writes, OOM near 900 jobs in the chaos
run; `moto_memory_check.py`). A table's copy now shares its stream shard (the undo above puts the
original back anyway): 355 MB after 600.
"""

import sys
import threading

from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.table import StreamShard
from moto.server import main

_writes = threading.RLock()


def _one_at_a_time(method):
    def locked(self, *args, **kwargs):
        with _writes:
            return method(self, *args, **kwargs)

    locked.__name__ = method.__name__
    return locked


for _name in ("put_item", "update_item", "delete_item"):
    setattr(DynamoDBBackend, _name, _one_at_a_time(getattr(DynamoDBBackend, _name)))

_transact_write_items = DynamoDBBackend.transact_write_items


def _transact_keeping_streams(self, transact_items):
    with _writes:
        before = dict(self.tables)
        shards = {
            name: (table.stream_shard, len(table.stream_shard.items))
            for name, table in before.items()
            if table.stream_shard is not None
        }
        try:
            return _transact_write_items(self, transact_items)
        except Exception:
            for name, (shard, length) in shards.items():
                restored = self.tables.get(name)
                if restored is not None and restored is not before[name]:
                    del shard.items[length:]
                    shard.table = restored
                    restored.stream_shard = shard
            raise


DynamoDBBackend.transact_write_items = _transact_keeping_streams
# The snapshot of a table shares its stream shard instead of copying the whole history.
StreamShard.__deepcopy__ = lambda self, memo: self

if __name__ == "__main__":
    sys.exit(main())
