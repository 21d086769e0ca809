-- Records the PostgreSQL sink could not store (sinks/intake.py), committed with the offsets that
-- pass them: a set-aside record is never skipped silently. The same dead letter goes to
-- ledger.sink-dlq; `verify` names these rows next to the gap they leave in a Merkle log.
CREATE TABLE sink_dead_letters (
    source_topic      text NOT NULL,
    source_partition  integer NOT NULL,
    source_offset     bigint NOT NULL,
    reason            text NOT NULL,
    detail            text NOT NULL,
    payload_size      integer NOT NULL,
    payload_sha256    text NOT NULL CHECK (payload_sha256 ~ '^[0-9a-f]{64}$'),
    set_aside_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);

CREATE TRIGGER sink_dead_letters_append_only BEFORE UPDATE OR DELETE ON sink_dead_letters
    FOR EACH ROW EXECUTE FUNCTION reject_change();
CREATE TRIGGER sink_dead_letters_no_truncate BEFORE TRUNCATE ON sink_dead_letters
    FOR EACH STATEMENT EXECUTE FUNCTION reject_change();
