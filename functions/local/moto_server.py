"""moto's server, as `moto_server` starts it, with the fixes kiln's fault suite needs.

moto 5.2.5 undoes a failed TransactWriteItems by putting back a deep copy of every table the
transaction named, taken before it ran. Two things go wrong when other requests run at the same
time (moto's server is threaded):

- a write another request made to those tables while the transaction ran is undone with it
  (a runner's "succeeded" lost because an unrelated submit's transaction failed its condition);
- the table's stream is replaced by the copy's, so every shard iterator handed out before (what a
  stream reader holds) follows a shard that no longer grows, and records of the failed
  transaction's first writes stay visible on it.

DynamoDB does neither. Here the item writes (put, update, delete, transactions) and the stream
reads take one lock, so a transaction and its undo are atomic with respect to the other writes
and to stream readers, and an undone transaction leaves the table with its original stream
shard, cut back to where it was.

The copies themselves were the other problem: a copy of every named table, whole, per
transaction (every submit), so a transaction's time and moto's memory grew with the tables.
Garbage after each transaction, but cyclic garbage freed late into fragmented arenas: moto's
resident memory grew by about 1.6 GB a minute under the 10,000-job burst (7 GB after 5 minutes,
headed for the machine's 24 GiB). Here no table is copied: before the transaction runs, the
items it names are saved (one deep copy each), and a failed transaction puts exactly those back.
"""

import copy
import sys
import threading

import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import StreamShard, Table
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

# A stream read takes the lock too: read while a transaction ran, it could see the records of
# the transaction's first writes before a failure cut them back. The reader's iterator then
# passed sequence numbers that the next writes reuse, and their records were never read (a job's
# `completed` webhook lost in a CI chaos run).
StreamShard.get = _one_at_a_time(StreamShard.get)


class _NoTableCopies:
    """The `copy` module as moto's DynamoDB backend sees it, except that a table is not copied:
    its transaction's "backup" is the table itself, so moto's own undo changes nothing and the
    item-level undo below does the work."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value, memo=None):
        if isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)


dynamodb_models.copy = _NoTableCopies()


def _saved_items(backend, transact_items):
    """(table, hash key, range key, a copy of the item or None) for each item a transaction names."""
    saved = []
    for entry in transact_items:
        _, op = next(iter(entry.items()))
        table = backend.tables.get(op.get("TableName"))
        if table is None:
            continue
        attributes = op.get("Key") or op.get("Item") or {}
        try:
            hash_value = DynamoType(attributes[table.hash_key_attr])
            range_value = DynamoType(attributes[table.range_key_attr]) if table.range_key_attr else None
            current = table.get_item(hash_value, range_value)
        except Exception:  # a malformed item: moto refuses the transaction before writing it
            continue
        saved.append((table, hash_value, range_value, copy.deepcopy(current)))
    return saved


def _put_back(saved):
    for table, hash_value, range_value, item in reversed(saved):
        if range_value is None:
            if item is None:
                table.items.pop(hash_value, None)
            else:
                table.items[hash_value] = item
        elif item is None:
            table.items[hash_value].pop(range_value, None)
        else:
            table.items[hash_value][range_value] = item


_transact_write_items = DynamoDBBackend.transact_write_items


def _transact_with_item_undo(self, transact_items):
    with _writes:
        saved = _saved_items(self, transact_items)
        streams = {
            id(table): (table.stream_shard, len(table.stream_shard.items))
            for table, _, _, _ in saved
            if table.stream_shard is not None
        }
        try:
            return _transact_write_items(self, transact_items)
        except Exception:
            _put_back(saved)
            for shard, length in streams.values():
                del shard.items[length:]
            raise


DynamoDBBackend.transact_write_items = _transact_with_item_undo

if __name__ == "__main__":
    sys.exit(main())
