"""The sink's processing steps, composed in commit order (as arroyo / snuba strategies):

    Decode -> BatchByTable -> WriteInThread -> CommitOffsets

1. `Decode` (decode.py): one Kafka message -> its table's rows.
2. `BatchByTable` (batch.py): rows -> one INSERT batch per table (by rows or age), or a
   recorded batch rebuilt exactly (rebuild.py); each batch carries the offsets that may
   be committed once it is written.
3. `WriteInThread` (write.py): record the batch's intent, then INSERT it under its
   token, in the INSERT thread; retried until it succeeds; batches complete in the order
   submitted.
4. `CommitOffsets` (commit.py): commit the offsets a written batch carries.

Every step has `submit` (hand it work), `poll` (non-blocking housekeeping; passes
finished work on) and `join` (finish everything handed over so far, down to the commit).
Offsets are only ever committed by step 4, and only for batches step 3 has written.
"""
